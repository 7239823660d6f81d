"""The settings of rds-expert's correction, validated once.

They are saved flat (tuned defaults, run records), in three groups: the monitor that flags
an answer (``tau``, ``window``, ``k``, and the gate's stricter monitor), the rollback and
steering that correct it (``rollback``, ``max_rollbacks``, ``recover``, ``retract_prefill``,
``use_expert``, ``expert_top``, ``base_top``, ``steer_tau``, ``steer_first``), and the
degeneration guard (``guard``, ``min_base_logprob``, ``loop_*``, ``near_*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError
from .monitor import RecoveryMonitor

@dataclass
class CorrectionSettings:
    """Knobs of the correcting decoder (defaults are per-model tuned later and saved with
    the probe; these are the fallbacks).

    ``tau``: token harm threshold (default: the probe's calibrated one). The monitor flags
    when at least ``k`` of the last ``window`` emitted tokens score at or above ``tau``.
    ``rollback``: ``answer`` (restart the answer) or ``sentence`` (restart the sentence).
    ``expert_top`` / ``base_top``: candidates taken from each model when steering.
    ``min_base_logprob``: the degeneration guard's floor: a steered token the base model
    gives a lower log-probability than this is only taken when nothing else passes.
    ``loop_ngram`` / ``loop_repeats``: a steered tail repeating an n-gram this often stops.
    ``loop_span``: in any mode, an answer whose tail is ``loop_repeats`` back-to-back copies
    of one span, covering at least ``loop_span`` tokens, or whose last ``near_window`` tokens
    are more than ``near_share`` repeated 4-grams (repeated in the window, or from earlier
    in the answer), is looping (an undefended model that
    loops is failing too). While watching, the expert then answers instead, from the
    rollback point (a ``loop`` event); a steered answer that loops is cut to its first copy
    and ends (a ``degeneration`` event).

    ``gate`` (needs a query probe): a request whose query-probe score is at or above
    ``gate`` is watched by a stricter monitor (``strict_tau``, ``strict_window``,
    ``strict_k``; each defaults to the normal one). A request that reads as harmful needs
    less evidence from the answer; a benign one keeps the normal monitor.
    ``blend`` (needs a query probe): each token's monitor score is ``(1 - blend) * harm +
    blend * query score`` (a trajectory score: the request's intent and the answer's harm
    over the monitor's window); 0, the default, reads the token's harm alone.
    ``steer_tau``: the harm a steered candidate must stay below (default: the tau of the
    monitor that flagged). Flagging looks for runs of harmful tokens, so its best tau can
    be loose; once an answer is flagged, each steered token is chosen against this one.
    ``steer_first``: greedy steered steps score this many candidates the base model finds
    plausible (and its own token) first, and the rest of the pool only when none of them
    passes the probe; the choice is the same as scoring the whole pool (0: score it whole).
    ``steer_end``: a steered answer may stop once its text ends a complete sentence: its
    stop token passes whatever the probe reads there. Stopping adds no text, and the probe
    reads a stop token after a harmful request as harmful (0.97 after a finished refusal),
    so without this the expert cannot end its refusal and writes on until it loops.
    ``end_lift``: with the expert, the stop passes only once the steered text holds a token
    the expert made at least this many nats more likely than the base model (log p_expert -
    log p_base): its correction ("not" in "I'm not going to ...") is in the text. A willing
    opening the base model would write too ("I'm glad to help with that.") cannot end the
    answer. 0: any complete sentence may end it.
    ``uncorrected`` (with the expert and the guard): what becomes of a steered answer that
    ends (by its stop token, a close, a loop cut or out of tokens) without such a token: its
    steered text is what the base model would have written too, so the correction failed.
    ``withhold`` (default): the steered text is dropped and the answer ends there (finish
    reason ``withheld``, OpenAI's ``content_filter``; a ``withhold`` event keeps the dropped
    text and its lift); after a rollback to the answer start the answer is empty. None of it
    had been streamed: the guard holds a steered tail back. ``release``: it ends as it is.
    ``close``: a steered answer ends cleanly: when it starts to loop, reaches
    ``max_new_tokens``, or ends (EOS) on an unfinished sentence, it ends after its last
    complete sentence (a ``close`` event, finish reason ``closed``) rather than mid-sentence
    (needs the guard, which keeps a steered tail unreleased; without a complete steered
    sentence it is cut as before).
    ``loop_expert``: which looping answers the expert answers instead. ``always``: every
    one. ``gated`` (with a gate): only where the gate reads the request as harmful; a
    looping answer to a request it reads as benign is the model's own, ended after its last
    complete sentence before the loop (the expert, trained to refuse, would refuse it);
    without a complete sentence, or without a gate, the expert answers as with ``always``.
    ``own_loops`` (with ``loop_expert: gated`` and a gate): what happens to a looping answer
    to a request the gate reads as benign, while the monitor has not flagged it. ``keep``
    (default): nothing; the answer is the model's own, loop included, as undefended (the
    defense changes only what it flags). ``close``: it ends after its last complete sentence
    before the loop (a ``close`` event); without one, the expert answers.
    ``end_check``: the answer's last token (EOS) is read as a verdict on the whole answer:
    when its monitor score is at or above the monitor's tau, the answer is flagged however
    few tokens it has (a k-of-window monitor cannot flag a willing answer shorter than it
    takes to see k flagged tokens, such as "I'm ready to help. What's the question?"). Not
    part of `rootdefense tune`'s replay: its cost on benign answers is measured by evaluation.
    ``steer_alpha``: for the first ``steer_alpha_tokens`` tokens of a steered answer, the
    candidates are ranked by SafeDecoding's amplified distribution ``p_base + steer_alpha *
    (p_expert - p_base)`` instead of the expert's own: where base and expert both open
    willingly inside a jailbreak template ("I'm here to help you create ..."), the tokens the
    expert raised most over the base model (its refusal) win the opening. 0: the expert's
    own ranking throughout.
    ``suspect_nll`` (needs a gate or a blend): a request that holds a span the model itself
    finds unreadable (the mean surprisal, in nats, of some ``suspect_window`` consecutive
    request tokens at or above ``suspect_nll``, as an optimised adversarial suffix does) reads
    as harmful to the gate and the blend (its query score is taken as 1), whatever the query
    probe says: an attacker who optimises a suffix against the query probe can drive its score
    to 0 and with it the blended monitor. The answer must still read harmful to the response
    probe to be flagged. The surprisal is the model's own, from the prefill's final hidden
    states, so the threshold is the model's: calibrate it on benign prompts (None: off).
    ``retract_prefill``: when the answer was forced to open with text (an assistant
    prefill) and the monitor flags it, the expert answers from the start of the assistant
    turn, withdrawing the forced opening (an explicit correction event with
    ``retracted_prefill``); off, it can only restart the continuation after that text.
    """

    tau: float | None = None
    window: int = 8
    k: int = 3
    rollback: str = "answer"
    max_rollbacks: int = 1  # 0 (watch only) or 1: steering lasts to the end of the answer
    expert_top: int = 10
    base_top: int = 10
    min_base_logprob: float = -12.0
    loop_ngram: int = 4
    loop_repeats: int = 3
    loop_span: int = 12
    near_window: int = 64  # near-repeat loop test over the last tokens (0: off)
    near_share: float = 0.8
    gate: float | None = None
    strict_tau: float | None = None
    strict_window: int | None = None
    strict_k: int | None = None
    blend: float = 0.0
    retract_prefill: bool = True
    steer_tau: float | None = None
    steer_first: int = 3  # greedy steering scores this many plausible candidates first (0: the whole pool)
    steer_alpha: float = 0.0  # amplify the expert's shift over the base model in a steered opening (see below)
    steer_alpha_tokens: int = 4
    steer_end: bool = True  # a steered answer may stop after a complete sentence (see below)
    end_lift: float = 3.0  # ... once the expert's correction is in it (see below)
    uncorrected: str = "withhold"  # "release": a steered answer without the correction is kept (see below)
    # ablation switches: each part can be turned off to measure what it adds
    use_expert: bool = True  # off: steer with the base model's own candidates only
    recover: bool = True  # off: steer from the flagged token on, keeping what was emitted
    guard: bool = True  # off: no plausibility floor, no loop stop
    close: bool = True  # off: a steered answer that loops or runs out of tokens may end mid-sentence
    loop_expert: str = "always"  # "gated": only where the gate reads the request as harmful (see below)
    own_loops: str = "keep"  # "close": a benign-gated looping answer ends before its loop (see below)
    end_check: bool = False  # the EOS token's score alone can flag the answer (see below)
    suspect_nll: float | None = None  # an unreadable span in the request reads as harmful (see below)
    suspect_window: int = 8

    def validate(self) -> None:
        if self.tau is not None and not 0 < self.tau < 1:
            raise InputError(f"tau must lie strictly between 0 and 1, got {self.tau}")
        if not 1 <= self.k <= self.window:
            raise InputError(f"recovery needs 1 <= k <= window, got k={self.k}, window={self.window}")
        if self.loop_expert not in ("always", "gated"):
            raise InputError(f"loop_expert must be 'always' or 'gated', got {self.loop_expert!r}")
        if self.uncorrected not in ("withhold", "release"):
            raise InputError(f"uncorrected must be 'withhold' or 'release', got {self.uncorrected!r}")
        if self.own_loops not in ("keep", "close"):
            raise InputError(f"own_loops must be 'keep' or 'close', got {self.own_loops!r}")
        if isinstance(self.end_lift, bool) or not isinstance(self.end_lift, (int, float)) or self.end_lift < 0:
            raise InputError(f"end_lift must be a number >= 0 (nats), got {self.end_lift!r}")
        for name in ("end_check", "steer_end"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rollback not in ("answer", "sentence"):
            raise InputError(f"rollback must be 'answer' or 'sentence', got {self.rollback!r}")
        for name in ("expert_top", "base_top", "loop_ngram", "loop_repeats", "loop_span"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rollbacks not in (0, 1):
            raise InputError(f"max_rollbacks must be 0 or 1 (steering lasts to the end), got {self.max_rollbacks}")
        if not isinstance(self.steer_first, int) or self.steer_first < 0:
            raise InputError(f"steer_first must be an integer >= 0 (0: score the whole pool at once), "
                             f"got {self.steer_first!r}")
        if not isinstance(self.steer_alpha, int | float) or isinstance(self.steer_alpha, bool) \
                or self.steer_alpha < 0:
            raise InputError(f"steer_alpha must be a number >= 0, got {self.steer_alpha!r}")
        if not isinstance(self.steer_alpha_tokens, int) or self.steer_alpha_tokens < 1:
            raise InputError(f"steer_alpha_tokens must be an integer >= 1, got {self.steer_alpha_tokens!r}")
        if self.near_window < 0 or not 0 < self.near_share < 1:
            raise InputError(f"near_window must be >= 0 and near_share in (0, 1), got {self.near_window}, "
                             f"{self.near_share}")
        if not isinstance(self.blend, int | float) or not 0 <= self.blend < 1:
            raise InputError(f"blend must lie in [0, 1), got {self.blend!r}")
        if self.gate is not None and not 0 <= self.gate < 1:
            raise InputError(f"gate must lie in [0, 1), got {self.gate}")
        if self.suspect_nll is not None:
            if isinstance(self.suspect_nll, bool) or not isinstance(self.suspect_nll, int | float) \
                    or self.suspect_nll <= 0:
                raise InputError(f"suspect_nll must be a surprisal in nats above 0, got {self.suspect_nll!r}")
        if isinstance(self.suspect_window, bool) or not isinstance(self.suspect_window, int) \
                or self.suspect_window < 1:
            raise InputError(f"suspect_window must be an integer >= 1, got {self.suspect_window!r}")
        for name in ("strict_tau", "steer_tau"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise InputError(f"{name} must lie strictly between 0 and 1, got {value}")
        window, k = self.strict_window or self.window, self.strict_k or self.k
        if not 1 <= k <= window:
            raise InputError(f"the strict monitor needs 1 <= strict_k <= strict_window, got k={k}, window={window}")

    @property
    def reads_request(self) -> bool:
        """Whether the monitor needs the request's query-probe score (a gate or a blend)."""
        return self.gate is not None or self.blend > 0

    def monitor(self, tau: float, strict: bool, query: float = 0.0) -> RecoveryMonitor:
        """The recovery monitor for a request (``strict``: the gate let it through as harmful;
        ``query``: its query-probe score, read when ``blend`` > 0)."""
        if not strict:
            return RecoveryMonitor(tau, self.window, self.k, query, self.blend)
        return RecoveryMonitor(self.strict_tau if self.strict_tau is not None else tau,
                               self.strict_window or self.window, self.strict_k or self.k, query, self.blend)

    def to_dict(self) -> dict:
        return asdict(self)
