"""Correction that works on models without a refusal reflex: RDS with a safety expert,
recovery by rollback, and a degeneration guard.

The decoder has two modes.

- **watch**: the base model decodes exactly as it would undefended; the probe reads the
  hidden state of every emitted token from the same forward (no extra cost), and a
  :class:`RecoveryMonitor` keeps a running harm statistic over the answer so far.
- **steer**: once the monitor flags the answer, it is rolled back (to the answer start, or
  to the start of the current sentence) and decoding goes on with two rows in one forward:
  the base model and the safety expert (peft mixed adapters on the same weights). The
  candidates are the union of both models' top tokens, each scored by the same probe on the
  base model's hidden state; the choice is the expert's most probable candidate that the
  probe passes and that the base model does not find implausible. A
  :class:`DegenerationGuard` stops steering that has turned into loops.

A token-wise rule cannot undo a sentence already emitted; rollback can. Streaming callers
are never silently rewritten: tokens are held back ``hold_back`` tokens before they reach
``on_token``, and a rollback that reaches tokens already sent emits an explicit
``correction`` event through ``on_event`` (also recorded in the trace).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError
from .candidates import candidate_mask, keep_candidate
from .config import GenerationConfig
from .kvcache import new_cache
from .loop import (
    Detokenizer,
    Generation,
    decode_timings,
    emit,
    end_reason,
    final_text,
    own_choice,
    sampling_rng,
)
from .trace import TokenStep, Trace
from .verify import crop_to, forward_chain, step_logprobs, verified_choice

BASE, EXPERT = "__base__", "expert"
SENTENCE_END = (".", "!", "?", "\n")


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
    ``steer_tau``: the harm a steered candidate must stay below (default: the tau of the
    monitor that flagged). Flagging looks for runs of harmful tokens, so its best tau can
    be loose; once an answer is flagged, each steered token is chosen against this one.
    ``steer_first``: greedy steered steps score this many candidates the base model finds
    plausible (and its own token) first, and the rest of the pool only when none of them
    passes the probe; the choice is the same as scoring the whole pool (0: score it whole).
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
    hold_back: int = 0
    gate: float | None = None
    strict_tau: float | None = None
    strict_window: int | None = None
    strict_k: int | None = None
    retract_prefill: bool = True
    steer_tau: float | None = None
    steer_first: int = 3  # greedy steering scores this many plausible candidates first (0: the whole pool)
    # ablation switches: each part can be turned off to measure what it adds
    use_expert: bool = True  # off: steer with the base model's own candidates only
    recover: bool = True  # off: steer from the flagged token on, keeping what was emitted
    guard: bool = True  # off: no plausibility floor, no loop stop

    def validate(self) -> None:
        if self.tau is not None and not 0 < self.tau < 1:
            raise InputError(f"tau must lie strictly between 0 and 1, got {self.tau}")
        if not 1 <= self.k <= self.window:
            raise InputError(f"recovery needs 1 <= k <= window, got k={self.k}, window={self.window}")
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
        if self.hold_back < 0:
            raise InputError(f"hold_back must be >= 0, got {self.hold_back}")
        if self.near_window < 0 or not 0 < self.near_share < 1:
            raise InputError(f"near_window must be >= 0 and near_share in (0, 1), got {self.near_window}, "
                             f"{self.near_share}")
        if self.gate is not None and not 0 <= self.gate < 1:
            raise InputError(f"gate must lie in [0, 1), got {self.gate}")
        for name in ("strict_tau", "steer_tau"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise InputError(f"{name} must lie strictly between 0 and 1, got {value}")
        window, k = self.strict_window or self.window, self.strict_k or self.k
        if not 1 <= k <= window:
            raise InputError(f"the strict monitor needs 1 <= strict_k <= strict_window, got k={k}, window={window}")

    def monitor(self, tau: float, strict: bool) -> RecoveryMonitor:
        """The recovery monitor for a request (``strict``: the gate let it through as harmful)."""
        if not strict:
            return RecoveryMonitor(tau, self.window, self.k)
        return RecoveryMonitor(self.strict_tau if self.strict_tau is not None else tau,
                               self.strict_window or self.window, self.strict_k or self.k)

    def to_dict(self) -> dict:
        return asdict(self)


class RecoveryMonitor:
    """Flags an answer when ``k`` of its last ``window`` tokens score at or above ``tau``."""

    def __init__(self, tau: float, window: int, k: int):
        self.tau, self.window, self.k = tau, window, k
        self.harms: list[float] = []

    def reset(self, keep: int = 0) -> None:
        self.harms = self.harms[:keep]

    def update(self, harm: float) -> bool:
        self.harms.append(harm)
        recent = self.harms[-self.window:]
        return sum(h >= self.tau for h in recent) >= self.k


class DegenerationGuard:
    """Three loop detectors.

    :meth:`looping` (steered tail): the last ``ngram`` tokens already occurred ``repeats``
    times within the tail. :meth:`periodic` (whole answer): the answer ends in ``repeats``
    back-to-back copies of one span, together at least ``span`` tokens long (a short span
    must repeat more often: "please, please, please, ..." needs ``span`` tokens of it).
    :meth:`near_repeat` (whole answer): in the last ``near_window`` tokens, more than
    ``near_share`` of the 4-grams occur more than once (repetition with variation, such as
    "Step 5: X. Step 6: X." or a period longer than the exact test looks for).
    :meth:`echo` (whole answer): more than ``near_share`` of the last ``near_window`` tokens'
    4-grams already occurred earlier in the answer (a paragraph repeated with a period longer
    than the window, which the window alone cannot see).
    :meth:`loop_cut` is the first of the three whole-answer tests that fires.

    Replayed on the undefended embedded model's answers of the first full correction run
    (60 benign, 180 harmful, 128 tokens): the periodic test fired on 3 benign answers and
    caught 74 of the 102 harmful answers the repetition metric calls degenerate; with
    near_repeat(64, 0.8) the guard fires on 4 benign answers (all 4 that the metric calls
    degenerate, one a runaway list of dates) and catches 90 of the 102. The echo test was
    chosen on the validation split's undefended answers (``results/tune``, 40 benign, 80
    harmful): it adds no benign firing there and catches 4 more of the 34 degenerate harmful
    answers (27 against 23).
    """

    def __init__(self, ngram: int, repeats: int, span: int = 12, max_period: int = 64, near_window: int = 64,
                 near_share: float = 0.8):
        self.ngram, self.repeats, self.span, self.max_period = ngram, repeats, span, max_period
        self.near_window, self.near_share = near_window, near_share
        self._echo_ids: list[int] = []  # the answer the echo test's 4-gram index covers
        self._echo_first: dict[tuple, int] = {}

    def loop_cut(self, tokens: list[int]) -> int | None:
        """Where a looping answer is cut (its length to keep), or None."""
        for test in (self.periodic, self.near_repeat, self.echo):
            cut = test(tokens)
            if cut is not None:
                return cut
        return None

    def periodic(self, tokens: list[int]) -> int | None:
        """The answer length to keep (up to the end of the first copy) when the tail loops;
        None otherwise."""
        n = len(tokens)
        for period in range(1, min(self.max_period, n // self.repeats) + 1):
            copies = max(self.repeats, -(-self.span // period))
            if period * copies > n:
                continue
            tail = tokens[n - period:]
            if all(tokens[n - (i + 1) * period:n - i * period] == tail for i in range(1, copies)):
                return n - (copies - 1) * period
        return None

    def near_repeat(self, tokens: list[int]) -> int | None:
        """When the last ``near_window`` tokens are mostly repeated 4-grams: the answer
        length to keep, up to the second occurrence of the window's first repeated 4-gram
        (the first round of the repetition stays); None otherwise (or when off: window 0)."""
        w, n = self.near_window, len(tokens)
        if w < 8 or n < w:
            return None
        start = n - w
        grams = [tuple(tokens[i:i + 4]) for i in range(start, n - 3)]
        counts = Counter(grams)
        if sum(c for c in counts.values() if c > 1) / len(grams) <= self.near_share:
            return None
        first: dict[tuple, int] = {}
        for i, g in enumerate(grams):
            if g in first and counts[g] > 1:
                return start + i
            first.setdefault(g, i)
        return None

    def echo(self, tokens: list[int]) -> int | None:
        """When most of the last ``near_window`` tokens' 4-grams already occurred earlier in
        the answer: the answer length to keep, up to the window's first such 4-gram (the
        earlier round stays); None otherwise (or when off: window 0)."""
        w, n = self.near_window, len(tokens)
        if w < 8 or n < w:
            return None
        first = self._first_grams(tokens)
        # window positions whose 4-gram occurred before
        repeats = [i for i in range(n - w, n - 3) if first[tuple(tokens[i:i + 4])] < i]
        if len(repeats) / (w - 3) <= self.near_share:
            return None
        return repeats[0]

    def _first_grams(self, tokens: list[int]) -> dict[tuple, int]:
        """Where each 4-gram of ``tokens`` first starts. Kept between calls: the decoders ask
        after every token, so when ``tokens`` extends the last answer asked about only the
        new 4-grams are indexed (linear in the answer, not quadratic); after a rollback or
        for another answer (a batch's rows share the guard) the index is rebuilt."""
        done = len(self._echo_ids)
        if len(tokens) < done or tokens[:done] != self._echo_ids:
            self._echo_ids, self._echo_first, done = [], {}, 0
        first = self._echo_first
        for i in range(max(0, done - 3), len(tokens) - 3):
            first.setdefault(tuple(tokens[i:i + 4]), i)
        self._echo_ids = list(tokens)
        return first

    def looping(self, tail: list[int]) -> bool:
        n = self.ngram
        if len(tail) < n * self.repeats:
            return False
        grams = Counter(tuple(tail[i:i + n]) for i in range(len(tail) - n + 1))
        return grams[tuple(tail[-n:])] >= self.repeats


class _Watcher:
    """Replays watch mode's decisions token by token (see :meth:`CorrectingDecoder.watcher`)."""

    def __init__(self, monitor: RecoveryMonitor, guard: DegenerationGuard | None, may_flag: bool):
        self.monitor, self.guard, self.may_flag = monitor, guard, may_flag

    def update(self, tokens: list[int], harm: float, loops: bool = True) -> bool:
        """True when watch mode would act after this token: a flag (always checked first),
        or, unless the token ended the answer with eos, a loop to cut."""
        flagged = self.monitor.update(harm) and self.may_flag
        return flagged or (loops and self.guard is not None and self.guard.loop_cut(tokens) is not None)


class _Stream:
    """Holds tokens back ``hold_back`` steps before handing them to ``on_token``; a rollback
    that reaches tokens already handed out becomes an explicit correction event."""

    def __init__(self, on_token, on_event, hold_back: int):
        self.on_token, self.on_event, self.hold_back = on_token, on_event, hold_back
        self.pending: list[tuple[TokenStep, str]] = []
        self.sent: list[str] = []

    def push(self, step: TokenStep, piece: str) -> None:
        self.pending.append((step, piece))
        while len(self.pending) > self.hold_back:
            self._send(*self.pending.pop(0))

    def _send(self, step: TokenStep, piece: str) -> None:
        self.sent.append(piece)
        if self.on_token is not None:
            self.on_token(step, piece)

    def rollback(self, keep_tokens: int, **info) -> dict:
        """Drop every token after the first ``keep_tokens`` of the answer; ``info`` (reason,
        positions) goes into the event."""
        total = len(self.sent) + len(self.pending)
        drop = total - keep_tokens
        from_pending = min(drop, len(self.pending))
        self.pending = self.pending[:len(self.pending) - from_pending]
        retract = drop - from_pending
        event = {"type": "rollback", "keep_tokens": keep_tokens, "dropped_tokens": drop,
                 "retracted_tokens": retract, **info}
        if retract:
            retracted_text = "".join(self.sent[len(self.sent) - retract:])
            self.sent = self.sent[:len(self.sent) - retract]
            event.update(type="correction", retracted_chars=len(retracted_text))
        if self.on_event is not None:
            self.on_event(event)
        return event

    def flush(self) -> None:
        while self.pending:
            self._send(*self.pending.pop(0))


@dataclass
class _State:
    """The answer so far: ids, per-step trace records, and the text pieces."""

    tokens: list[int] = field(default_factory=list)
    steps: list[TokenStep] = field(default_factory=list)
    mode: str = "watch"
    steer_from: int = 0  # answer index where steering began


class CorrectingDecoder:
    """Watch, and when the answer turns harmful roll back and steer with the expert.

    ``expert`` is a :class:`rootdefense.expert.SharedExpert` on the same model (switched
    off except inside this decoder's steered forwards); ``probe`` a response-position probe.
    """

    def __init__(self, model, tokenizer, probe, expert, settings: CorrectionSettings | None = None,
                 eos_token_ids: list[int] | None = None, drafter=None, max_draft: int = 8, query_probe=None):
        self.model, self.tokenizer, self.probe, self.expert = model, tokenizer, probe, expert
        self.drafter, self.max_draft, self.query_probe = drafter, max_draft, query_probe
        self.settings = settings or CorrectionSettings()
        self.settings.validate()
        if self.settings.gate is not None and query_probe is None:
            raise InputError("a gated monitor (correction setting 'gate') needs a query probe; train one with "
                             "`rootdefense probe train --kind query` or drop the gate")
        self.tau = self.settings.tau if self.settings.tau is not None else probe.threshold
        self.eos = set(eos_token_ids or [])
        self.guard = DegenerationGuard(self.settings.loop_ngram, self.settings.loop_repeats, self.settings.loop_span,
                                       near_window=self.settings.near_window, near_share=self.settings.near_share)
        self.rows = 2 if self.settings.use_expert else 1  # steered forwards: base (+ expert)

    def describe(self) -> dict:
        out = {"rule": "correct", **self.settings.to_dict(), "tau": self.tau}
        if self.drafter is not None:
            out.update(self.drafter.describe(), max_draft=self.max_draft)
        return out

    # ------------------------------------------------------------------ forwards

    def _forward(self, input_ids, cache, position_ids=None, attention_mask=None, rows=1, last_only=False):
        """One forward of the base row (watch) or of base + expert rows (steer)."""
        kwargs = {"input_ids": input_ids, "cache": cache, "use_cache": True,
                  "output_hidden_states": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if last_only:
            kwargs["logits_to_keep"] = 1
        if rows == 1:
            return self.model(**kwargs)
        with self.expert.active() as peft_model:
            return peft_model(adapter_names=[BASE, EXPERT], **kwargs)

    def _candidates(self, cache, token_ids: torch.Tensor, prefix_len: int, rows: int):
        """Score ``token_ids`` (m,) as alternative next tokens in every row; returns logits
        (rows, m, vocab) and the base row's probe harms (m,)."""
        m = int(token_ids.shape[0])
        device = token_ids.device
        mask = candidate_mask(prefix_len, m, self.model.dtype, device).expand(rows, 1, m, prefix_len + m) \
            if m > 1 or rows > 1 else None
        out = self._forward(token_ids[None].expand(rows, m),
                            cache, torch.full((rows, m), prefix_len, dtype=torch.long, device=device), mask, rows)
        hidden = out.hidden_states[self.probe.layer][0].float()
        return out.logits.float(), self.probe.score(hidden).cpu()

    def _steer_step(self, cache, pool, lp_e, lp_b, own_idx: int, floor: float, tau: float, prefix_len: int, rng,
                    stats: dict):
        """Choose a steered token (:func:`_steer_choice`) and leave its keys and values in
        the cache. Greedy, the pool is scored in two stages: first the first
        ``steer_first`` candidates the base model finds plausible (the pool runs from the
        expert's most probable down) and the model's own token (``own_idx``); the rest only
        when none of those plausible ones passes the probe. Then the choice is the whole
        pool's: the first plausible candidate that passes comes before every plausible one
        left unscored. Sampling scores the whole pool. Returns the choice's index in
        ``pool``, the harms (NaN where not scored) and the logits after the choice (rows, vocab)."""
        device = next(self.model.parameters()).device
        m = len(pool)
        first = (lp_b[pool] >= floor).nonzero()[:, 0].tolist()[:self.settings.steer_first]
        head = sorted(set(first) | {own_idx})
        staged = rng is None and bool(first) and len(head) < m
        stages = [head, [i for i in range(m) if i not in head]] if staged else [list(range(m))]
        harms = torch.full((m,), math.nan)
        for n, idx in enumerate(stages):
            step_logits, h = self._candidates(cache, pool[idx].to(device), prefix_len, rows=self.rows)
            stats["forwards"] += 1
            harms[idx] = h
            if staged and n == 0:
                j = next((i for i in first if harms[i] < tau), None)
                if j is None:  # none of the first plausible candidates passes: score the rest
                    crop_to(cache, prefix_len)
                    continue
            else:
                j = _steer_choice(pool, lp_e, lp_b, harms, tau, floor, rng)
            if j in idx:
                keep_candidate(cache, prefix_len, len(idx), idx.index(j))
                return j, harms, step_logits[:, idx.index(j)]
            # the choice was scored in the first stage (the least harmful of all): forward it alone
            crop_to(cache, prefix_len)
            step_logits, _ = self._candidates(cache, pool[j:j + 1].to(device), prefix_len, rows=self.rows)
            stats["forwards"] += 1
            return j, harms, step_logits[:, 0]
        raise AssertionError("unreachable: the last stage always chooses")

    def _prefill(self, ids: torch.Tensor, rows: int):
        """A fresh cache over ``ids`` (1, T) in ``rows`` rows; last-position logits (rows, vocab)."""
        cache = new_cache(self.model)
        out = self._forward(ids.expand(rows, -1), cache, rows=rows, last_only=True)
        return cache, out.logits[:, -1].float()

    def watcher(self, strict: bool = False) -> _Watcher:
        """What watch mode reacts to, for a batch decoding this answer undefended: the
        answer must go to this decoder once the monitor would flag it or the loop guard
        would cut it (from there on the two differ). ``strict``: see :meth:`gate`."""
        return _Watcher(self.settings.monitor(self.tau, strict), self.guard if self.settings.guard else None,
                        self.settings.max_rollbacks > 0)

    def gate(self, hidden_states, query_at: int) -> dict | None:
        """The gate's verdict on a request from a forward's hidden states: the query probe's
        score at the request's last token (``query_at``) and whether the strict monitor
        applies. None when no gate is set."""
        if self.settings.gate is None:
            return None
        h = hidden_states[self.query_probe.layer][0, query_at].float()[None]
        score = float(self.query_probe.score(h)[0])
        return {"query_score": round(score, 4), "strict": score >= self.settings.gate}

    def _watch_chain(self, cache, logits, prefix_len: int, context: list[int], room: int, cfg, rng,
                     pending: int | None, stats: dict):
        """Watch mode: the model's own next token, then the drafter's guess, verified in ONE
        forward of the base model. Returns the verified tokens as (token, logprobs, harm,
        next logits) and the model's own token where the draft was rejected (already drawn,
        so sampling stays exact), or None. With no drafter the chain is the one own token,
        the plain watch step. The cache keeps exactly the verified tokens."""
        lp = step_logprobs(logits[0], cfg)
        own = pending if pending is not None else own_choice(lp, cfg, rng)
        draft = []
        if self.drafter is not None and room > 1:
            draft = self.drafter.propose(context + [own], min(self.max_draft, room - 1))[:room - 1]
        chain = [own] + draft
        out = forward_chain(self.model, cache, torch.tensor(chain, device=logits.device), prefix_len, self.probe.layer)
        harms = self.probe.score(out.hidden).cpu().tolist()
        verified = [(own, lp, harms[0], out.logits[0])]
        rejected = None
        for i in range(1, len(chain)):
            lp_i = step_logprobs(out.logits[i - 1], cfg)
            mine = verified_choice(lp_i, chain[i], cfg, rng)
            if mine != chain[i]:
                rejected = mine
                break
            verified.append((chain[i], lp_i, harms[i], out.logits[i]))
        if self.drafter is not None:
            self.drafter.accepted(len(draft), len(verified) - 1)
        crop_to(cache, prefix_len + len(verified))
        stats["forwards"] += 1
        stats["drafted"] += len(draft)
        stats["accepted"] += len(verified) - 1
        return verified, rejected

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cfg: GenerationConfig, on_token=None, on_event=None,
                 query_len: int | None = None) -> Generation:
        """``query_len``: how many of ``input_ids`` are the request (default: all); the rest
        is an opening forced into the answer (an assistant prefill)."""
        s = self.settings
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        rng = sampling_rng(cfg)
        prompt_len = int(input_ids.shape[1])
        query_len = prompt_len if query_len is None else query_len
        if not 1 <= query_len <= prompt_len:
            raise InputError(f"query_len must lie in 1..{prompt_len} (the prompt's length), got {query_len}")
        t0 = time.perf_counter()
        cache = new_cache(self.model)
        out = self._forward(input_ids, cache, last_only=True)
        logits = out.logits[:, -1].float()
        gate = self.gate(out.hidden_states, query_len - 1)
        del out
        t_prefill = time.perf_counter() - t0
        st = _State()
        monitor = s.monitor(self.tau, gate is not None and gate["strict"])
        steer_tau = s.steer_tau if s.steer_tau is not None else monitor.tau
        stream = _Stream(on_token, on_event, s.hold_back)
        trace = Trace()
        detok = Detokenizer(self.tokenizer)
        events: list[dict] = []
        rollbacks = 0
        context = input_ids[0].tolist()
        verified: list = []  # watch mode: tokens verified ahead (cache holds them), in order
        rejected = None  # the model's own token where a draft was rejected
        stats = {"forwards": 0, "drafted": 0, "accepted": 0}
        if self.drafter is not None:
            self.drafter.reset()
        t1 = time.perf_counter()
        while len(st.tokens) < cfg.max_new_tokens:
            prefix_len = prompt_len + len(st.tokens)
            temp = cfg.temperature if not cfg.greedy else 1.0
            if st.mode == "watch":
                if not verified:  # propose (own token + draft), score and verify in one forward
                    verified, rejected = self._watch_chain(
                        cache, logits, prefix_len, context + st.tokens, cfg.max_new_tokens - len(st.tokens),
                        cfg, rng, rejected, stats)
                token, lp, harm, next_logits = verified.pop(0)
                step, piece = emit(detok, token, token, lp, harm, harm, 1)
                logits = next_logits[None]
                flagged = monitor.update(harm)
            else:
                lp_b = torch.log_softmax(logits[0] / temp, dim=-1).cpu()
                lp_e = torch.log_softmax(logits[1] / temp, dim=-1).cpu() if s.use_expert else lp_b
                own = own_choice(lp_b, cfg, rng)
                pool = _union_pool(lp_e, lp_b, own, s.expert_top, s.base_top)
                own_j = int((pool == own).nonzero()[0, 0])
                floor = s.min_base_logprob if s.guard else -math.inf
                j, harms, logits = self._steer_step(cache, pool, lp_e, lp_b, own_j, floor, steer_tau, prefix_len,
                                                    rng, stats)
                token = int(pool[j])
                own_harm = float(harms[own_j])  # the own token is always scored
                step, piece = emit(detok, token, own, lp_b, float(harms[j]), own_harm, len(pool),
                                   source="expert" if s.use_expert else "steered")
                flagged = False
            st.tokens.append(token)
            st.steps.append(step)
            if flagged and rollbacks < s.max_rollbacks:
                verified, rejected = [], None  # the cache is rebuilt below: nothing verified ahead survives
            if flagged and rollbacks < s.max_rollbacks and not s.recover:
                events.append({"type": "steer", "reason": "harm", "at_token": len(st.tokens),
                               "harms": [round(h, 4) for h in monitor.harms[-monitor.window:]]})
                rollbacks += 1
                detok, cache, logits = self._steer_from(st, len(st.tokens), input_ids)
            elif flagged and rollbacks < s.max_rollbacks:
                retract = s.retract_prefill and query_len < prompt_len
                keep = 0 if retract else self._rollback_point(st.tokens)
                info = {}
                if retract:  # the forced opening goes too: the expert answers the request afresh
                    info = {"retracted_prefill": True, "type": "correction", "retracted_prefill_text": self.tokenizer.decode(
                        input_ids[0, query_len:], skip_special_tokens=True)}
                    input_ids, prompt_len = input_ids[:, :query_len], query_len
                    context = input_ids[0].tolist()
                event = stream.rollback(
                    keep, reason="harm", at_token=len(st.tokens), harms=[round(h, 4) for h in monitor.harms[-monitor.window:]],
                    dropped_text=self.tokenizer.decode(st.tokens[keep:], skip_special_tokens=True),
                    answer_tokens_dropped=len(st.tokens) - keep)  # incl. the flagged token, never streamed
                event.update(info)
                events.append(event)
                rollbacks += 1
                detok, cache, logits = self._steer_from(st, keep, input_ids)
                continue
            stream.push(step, piece)
            reason = end_reason(token, self.eos, detok.text, cfg)
            if reason == "eos":
                trace.finish_reason = reason
                break
            cut = self._loop_cut(st) if s.guard else None
            if cut is not None and st.mode == "watch" and s.use_expert and rollbacks < s.max_rollbacks:
                # the undefended answer loops: a failure too; the expert answers instead
                keep = self._rollback_point(st.tokens[:cut])
                events.append(stream.rollback(
                    keep, reason="loop", at_token=len(st.tokens),
                    dropped_text=self.tokenizer.decode(st.tokens[keep:], skip_special_tokens=True)))
                rollbacks += 1
                verified, rejected = [], None
                detok, cache, logits = self._steer_from(st, keep, input_ids)
                continue
            if cut is not None:
                events.append(stream.rollback(cut, reason="degeneration", at_token=len(st.tokens)))
                st.tokens, st.steps = st.tokens[:cut], st.steps[:cut]
                detok = _detok_of(self.tokenizer, st.tokens)
                trace.finish_reason = "degenerate"
                break
            if reason == "stop":
                trace.finish_reason = reason
                break
        elapsed = time.perf_counter() - t1
        trace.steps, trace.events, trace.gate = st.steps, events, gate
        stream.flush()
        timings = decode_timings(t_prefill, elapsed, len(st.tokens))
        if self.drafter is not None:
            timings.update(stats, tokens_per_forward=round(len(st.steps) / max(1, stats["forwards"]), 3))
        return Generation(text=final_text(detok.text, trace, cfg), token_ids=list(st.tokens), trace=trace,
                          prompt_tokens=prompt_len, timings=timings)

    # ------------------------------------------------------------------ helpers

    def _steer_from(self, st: _State, keep: int, input_ids: torch.Tensor):
        """Keep the first ``keep`` answer tokens and switch to steering from there: a fresh
        detokenizer, and a cache over prompt + kept tokens in the steering rows."""
        st.tokens, st.steps = st.tokens[:keep], st.steps[:keep]
        st.mode, st.steer_from = "steer", keep
        ids = torch.cat([input_ids, torch.tensor([st.tokens], dtype=input_ids.dtype, device=input_ids.device)], 1) \
            if st.tokens else input_ids
        cache, logits = self._prefill(ids, rows=self.rows)
        return _detok_of(self.tokenizer, st.tokens), cache, logits

    def _rollback_point(self, tokens: list[int]) -> int:
        """Answer index to restart from: 0, or just after the last sentence end before the
        flagged window."""
        if self.settings.rollback == "answer":
            return 0
        limit = max(0, len(tokens) - self.settings.window)
        for i in range(limit, 0, -1):
            piece = self.tokenizer.decode(tokens[i - 1:i], skip_special_tokens=True)
            if piece.rstrip(" ").endswith(SENTENCE_END):
                return i
        return 0

    def _loop_cut(self, st: _State) -> int | None:
        """Where to cut a looping answer (None: not looping). Any answer ending in back-to-back
        copies keeps the first copy; a steered tail repeating an n-gram keeps what came before
        the n-gram's second occurrence (the first round of the loop, whole)."""
        cut = self.guard.loop_cut(st.tokens)
        if cut is not None or st.mode != "steer" or not self.guard.looping(st.tokens[st.steer_from:]):
            return cut
        n = self.settings.loop_ngram
        gram = st.tokens[-n:]
        starts = [i for i in range(st.steer_from, len(st.tokens) - n + 1) if st.tokens[i:i + n] == gram]
        return starts[1] if len(starts) > 1 else len(st.tokens)


def _detok_of(tokenizer, tokens: list[int]) -> Detokenizer:
    """A detokenizer positioned after ``tokens`` (after a rollback or a trim)."""
    detok = Detokenizer(tokenizer)
    for t in tokens:
        detok.push(t)
    return detok


def _union_pool(lp_e: torch.Tensor, lp_b: torch.Tensor, own: int, expert_top: int, base_top: int) -> torch.Tensor:
    """The expert's top tokens, then the base model's (and its own choice) not yet in,
    most expert-probable first."""
    ids = torch.cat([torch.topk(lp_e, expert_top).indices, torch.topk(lp_b, base_top).indices,
                     torch.tensor([own])])
    uniq = list(dict.fromkeys(ids.tolist()))
    uniq.sort(key=lambda t: -float(lp_e[t]))
    return torch.tensor(uniq, dtype=torch.long)


def _steer_choice(pool, lp_e, lp_b, harms, tau: float, min_base_logprob: float, rng) -> int:
    """The expert's most probable candidate that the probe passes (harm < tau) and the base
    model finds plausible (log p >= floor); else any candidate the probe passes; else the
    least harmful. Sampling draws from the expert's distribution over the allowed set."""
    safe = harms < tau
    plausible = lp_b[pool] >= min_base_logprob
    for allowed in (safe & plausible, safe):
        if bool(allowed.any()):
            scores = lp_e[pool].masked_fill(~allowed, -math.inf)
            if rng is None:
                return int(torch.argmax(scores).item())
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=rng).item())
    return int(torch.argmin(harms).item())
