"""rds-expert's correction hook: what the engine asks after every token a row commits.

A row starts in **watch** mode: the base model decodes exactly as it would undefended, the
probe's harm of every token comes out of the same forward, and the row's monitor keeps a
running statistic. Once the monitor flags the answer, the hook tells the engine to roll the
row back (to the answer start, or to the current sentence's) and to go on **steering**: the
row then carries an expert row beside it in the batch, and each position is chosen among
the expert's and the base model's top tokens by the probe (see :mod:`.steering`). The
degeneration guard stops loops in either mode.

The hook also says how far back it may still rewind a row (:meth:`Correction.final_len`):
text before that point can never be withdrawn, so a streamer may send it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..decoding.generation import end_reason
from ..errors import InputError
from .guard import DegenerationGuard
from .monitor import RecoveryMonitor, gate_score
from .settings import CorrectionSettings
from .suspicion import suspicion, template_span

SENTENCE_END = (".", "!", "?", "\n")
_LIST_MARKER = re.compile(r"(?:^|\n)\s*(?:\d+|[a-zA-Z])\.$")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def complete_sentence(text: str) -> bool:
    """Whether ``text`` ends with a finished sentence: ., ! or ? (a closing quote or bracket
    may follow), not a list marker such as "2." on its own."""
    t = text.rstrip().rstrip("\"')]\u201d\u2019")
    return bool(t) and t[-1] in ".!?" and not _LIST_MARKER.search(t)


@dataclass
class RowCorrection:
    """One row's correction state."""

    monitor: RecoveryMonitor
    guard: DegenerationGuard | None
    steer_tau: float
    gate: dict | None
    mode: str = "watch"  # or "steer"
    steer_from: int = 0  # answer index where steering began
    rollbacks: int = 0
    lift: float = 0.0  # the most the expert raised a steered token over the base model (nats)


@dataclass
class Verdict:
    """What the engine does after a token: ``keep`` not None: the row goes on steering from
    its first ``keep`` answer tokens (a rollback, or steering in place); ``cut``: keep only
    that many tokens; ``finish``: the answer ends with that reason; ``retract``: the forced
    opening of the answer (an assistant prefill) goes too."""

    keep: int | None = None
    cut: int | None = None
    finish: str | None = None
    retract: bool = False


class Correction:
    """Watch, and when the answer turns harmful roll back and steer with the expert.

    ``expert`` is a :class:`rootdefense.expert.SharedExpert` on the same model (switched off
    except inside forwards that carry expert rows); ``probe`` a response-position probe;
    ``query_probe`` the gate's (needed when ``settings.gate`` is set)."""

    def __init__(self, probe, settings: CorrectionSettings | None = None, expert=None, query_probe=None,
                 tokenizer=None):
        self.settings = settings or CorrectionSettings()
        self.settings.validate()
        if self.settings.reads_request and query_probe is None:
            raise InputError("a gated or blended monitor (correction setting 'gate' or 'blend') needs a query "
                             "probe; train one with `rootdefense probe train --kind query` or drop them")
        if self.settings.suspect_nll is not None and not self.settings.reads_request:
            raise InputError("suspect_nll acts through the gate or the blend: set 'gate' or 'blend' too")
        if self.settings.use_expert and expert is None:
            raise InputError("steering with the expert (use_expert) needs a loaded expert adapter")
        self.probe, self.expert, self.query_probe, self.tokenizer = probe, expert, query_probe, tokenizer
        self._span: tuple[int, int] | None = None  # the chat template's span, on first use
        self.tau = self.settings.tau if self.settings.tau is not None else probe.threshold
        self.max_cut = self._guard().max_cut()

    @property
    def twin(self) -> bool:
        """Whether a steered row carries an expert row beside it."""
        return self.settings.use_expert

    def _guard(self) -> DegenerationGuard:
        s = self.settings
        return DegenerationGuard(s.loop_ngram, s.loop_repeats, s.loop_span, near_window=s.near_window,
                                 near_share=s.near_share)

    def describe(self) -> dict:
        return {"rule": "correct", **self.settings.to_dict(), "tau": self.tau}

    # ------------------------------------------------------------------ per row

    @property
    def reads_prompt(self) -> bool:
        """Whether :meth:`start` needs the request tokens' surprisal (``suspect_nll`` set)."""
        return self.settings.suspect_nll is not None

    def template_span(self) -> tuple[int, int]:
        """The chat template's tokens before and after a request's content (computed once)."""
        if self._span is None:
            self._span = template_span(self.tokenizer)
        return self._span

    def suspicion(self, surprisal) -> float:
        """The request's suspicion (:func:`.suspicion.suspicion`) from its tokens' surprisal."""
        return suspicion(surprisal, self.template_span(), self.settings.suspect_window)

    def start(self, query_hidden, surprisal=None) -> RowCorrection:
        """A row's state; ``query_hidden``: the hidden state (H,) at the request's last token
        at the query probe's layer (used when a gate or a blend is set); ``surprisal``: the
        request tokens' surprisal (needed when ``suspect_nll`` is set, see :meth:`suspicion`)."""
        s = self.settings
        gate, score = None, 0.0
        if s.reads_request:
            score = gate_score(self.query_probe, query_hidden)
            gate = {"query_score": round(score, 4)}
            if s.suspect_nll is not None:
                if surprisal is None:
                    raise InputError("suspect_nll needs the request tokens' surprisal from the prefill")
                gate["suspicion"] = round(self.suspicion(surprisal), 3)
                gate["suspect"] = gate["suspicion"] >= s.suspect_nll
                if gate["suspect"]:
                    score = 1.0  # an unreadable span: the request reads as harmful
            gate["strict"] = s.gate is not None and score >= s.gate
        monitor = s.monitor(self.tau, gate is not None and gate["strict"], score)
        return RowCorrection(monitor=monitor, guard=self._guard() if s.guard else None,
                             steer_tau=s.steer_tau if s.steer_tau is not None else monitor.tau, gate=gate)

    def after_token(self, rc: RowCorrection, row, eos: set[int]) -> Verdict:
        """The verdict after ``row`` committed a token (its last trace step)."""
        v = self._verdict(rc, row, eos)
        if self._uncorrected(rc, row, v):
            # the steered answer ends without the expert's correction in it (``uncorrected:
            # withhold``): none of it is released; the answer ends there, filtered
            kept = rc.steer_from
            end = len(row.tokens) if v.cut is None else v.cut
            row.trace.events.append({"type": "withhold", "reason": "uncorrected", "keep_tokens": kept,
                                     "dropped_tokens": len(row.tokens) - kept, "at_token": len(row.tokens),
                                     "lift": round(rc.lift, 3), "end_lift": self.settings.end_lift,
                                     "would_finish": v.finish or "length",
                                     "dropped_text": self._text(row.tokens[kept:end])})
            return Verdict(keep=v.keep, cut=kept, finish="withheld")
        return v

    def _uncorrected(self, rc: RowCorrection, row, v: Verdict) -> bool:
        """Whether a steered row ends now (this verdict, or out of tokens) without a token the
        expert raised at least ``end_lift`` nats over the base model, with ``uncorrected:
        withhold`` (its steered text is unreleased: the guard holds it back)."""
        if not (self.settings.uncorrected == "withhold" and rc.mode == "steer" and rc.guard is not None
                and not self.corrected(rc)):
            return False
        return v.finish is not None or (v.keep is None and len(row.tokens) >= row.cfg.max_new_tokens)

    def _verdict(self, rc: RowCorrection, row, eos: set[int]) -> Verdict:
        s = self.settings
        tokens, n = row.tokens, len(row.tokens)
        steer = None
        final = s.end_check and tokens[-1] in eos
        if rc.mode == "watch" and rc.monitor.update(row.trace.steps[-1].harm, final) \
                and rc.rollbacks < s.max_rollbacks:
            harms = [round(h, 4) for h in rc.monitor.harms[-rc.monitor.window:]]
            rc.rollbacks += 1
            if not s.recover:  # ablation: steer from the flagged token on, keeping what was emitted
                row.trace.events.append({"type": "steer", "reason": "harm", "at_token": n, "harms": harms})
                rc.mode, rc.steer_from = "steer", n
                steer = n
            else:
                retract = s.retract_prefill and row.query_len < len(row.prompt)
                keep = 0 if retract else self.rollback_point(tokens)
                event = self._rollback_event(tokens, keep, "harm", harms=harms, **({"at_end": True} if final else {}))
                if retract:  # the forced opening goes too: the expert answers the request afresh
                    event.update(type="correction", retracted_prefill=True,
                                 retracted_prefill_text=self._text(row.prompt[row.query_len:]))
                row.trace.events.append(event)
                rc.mode, rc.steer_from = "steer", keep
                return Verdict(keep=keep, retract=retract)
        reason = end_reason(tokens[-1], eos, row.detok.text, row.cfg)
        if reason == "eos":
            if rc.mode == "steer" and not complete_sentence(self._text(tokens[rc.steer_from:])):
                # the expert ended on a fragment ("... Safe travels"): end after its last sentence
                if (v := self._close(rc, row, steer, n - 1, "eos")) is not None:
                    return v
            return Verdict(keep=steer, finish=reason)
        if rc.mode == "steer" and (i := self._repeat_start(rc, tokens)) is not None:
            # the expert says a sentence again ("I can't help with that. I can't help with that."):
            # the answer ends before the repeat
            if (v := self._close(rc, row, steer, i, "repeat")) is not None:
                return v
        cut = self._loop_cut(rc, tokens) if rc.guard is not None and not self.keeps_loops(rc) else None
        if rc.mode == "steer" and (cut is not None or (reason is None and n >= row.cfg.max_new_tokens)):
            end, why = (cut, "loop") if cut is not None else (n, "length")
            if (v := self._close(rc, row, steer, end, why)) is not None:
                return v
        if cut is not None and self._own_answer(rc):
            # a request the gate reads as benign loops (own_loops: close): the model's own
            # answer ends after its last complete sentence (the expert would refuse it); else as below
            if (v := self._close(rc, row, steer, cut, "loop", start=self.final_len(rc, row))) is not None:
                return v
        if cut is not None and rc.mode == "watch" and s.use_expert and rc.rollbacks < s.max_rollbacks:
            # the undefended answer loops: a failure too; the expert answers instead
            keep = self.rollback_point(tokens[:cut])
            row.trace.events.append(self._rollback_event(tokens, keep, "loop"))
            rc.rollbacks += 1
            rc.mode, rc.steer_from = "steer", keep
            return Verdict(keep=keep)
        if cut is not None:
            row.trace.events.append({"type": "rollback", "keep_tokens": cut, "dropped_tokens": n - cut,
                                     "reason": "degeneration", "at_token": n})
            return Verdict(keep=steer, cut=cut, finish="degenerate")
        return Verdict(keep=steer, finish=reason)

    def steered(self, rc: RowCorrection, lift: float) -> None:
        """A steered token was chosen that the expert made ``lift`` nats more likely than the
        base model."""
        rc.lift = max(rc.lift, lift)

    def may_end(self, rc: RowCorrection, row) -> bool:
        """Whether a steered row may stop now whatever the probe reads at its stop token
        (``steer_end``): its steered text ends a complete sentence and, with the expert, holds
        the expert's correction (``end_lift``)."""
        return self.settings.steer_end and rc.mode == "steer" and self.corrected(rc) and \
            complete_sentence(self._text(row.tokens[rc.steer_from:]))

    def corrected(self, rc: RowCorrection) -> bool:
        """Whether the steered text holds the expert's correction: a token it raised at least
        ``end_lift`` nats over the base model (always, when the base model steers alone)."""
        return not self.twin or rc.lift >= self.settings.end_lift

    def _own_answer(self, rc: RowCorrection) -> bool:
        """The row is unflagged and its request reads as benign to the gate, with ``loop_expert:
        gated``: the expert does not take its loops."""
        s = self.settings
        return rc.mode == "watch" and s.loop_expert == "gated" and s.gate is not None and not rc.gate["strict"]

    def keeps_loops(self, rc: RowCorrection) -> bool:
        """The row's loops are left alone (``own_loops: keep``): it ends as undefended would."""
        return self.settings.own_loops == "keep" and self._own_answer(rc)

    def final_len(self, rc: RowCorrection, row) -> int:
        """How many of the row's answer tokens no later verdict can withdraw."""
        s, n = self.settings, len(row.tokens)
        reach = max(0, n - self.max_cut)  # the guard's loop cuts take at most max_cut tokens off the end
        if rc.mode == "steer":  # a steered tail that loops is cut anywhere after steer_from
            return min(rc.steer_from, reach) if rc.guard is not None else n
        loops = rc.guard is not None and not self.keeps_loops(rc)  # a loop may still be cut
        bounds = [reach] if loops else []
        if rc.rollbacks < s.max_rollbacks:
            if s.recover:
                retract = s.retract_prefill and row.query_len < len(row.prompt)
                bounds.append(0 if retract else self.rollback_point(row.tokens))
            if loops and s.use_expert:
                bounds.append(self.rollback_point(row.tokens[:reach]))
        return min(bounds, default=n)

    # ------------------------------------------------------------------ helpers

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _rollback_event(self, tokens: list[int], keep: int, reason: str, **info) -> dict:
        return {"type": "rollback", "keep_tokens": keep, "dropped_tokens": len(tokens) - keep, "reason": reason,
                "at_token": len(tokens), **info, "dropped_text": self._text(tokens[keep:]),
                "answer_tokens_dropped": len(tokens) - keep}

    def rollback_point(self, tokens: list[int]) -> int:
        """Answer index to restart from: 0, or just after the last sentence end before the
        flagged window."""
        if self.settings.rollback == "answer":
            return 0
        for i in range(max(0, len(tokens) - self.settings.window), 0, -1):
            if self._text(tokens[i - 1:i]).rstrip(" ").endswith(SENTENCE_END):
                return i
        return 0

    def _close(self, rc: RowCorrection, row, steer: int | None, end: int, reason: str,
               start: int | None = None) -> Verdict | None:
        """End the answer after its last complete sentence at or before ``end`` and after
        ``start`` (default: where steering began), recording a ``close`` event. Only text
        after ``start`` is dropped, and none of it has been released (see :meth:`final_len`);
        None when closing is off or no sentence ends there."""
        if not (self.settings.close and rc.guard is not None):
            return None
        tokens = row.tokens
        start = rc.steer_from if start is None else start
        for i in range(end, start, -1):
            text = self._text(tokens[start:i])
            if complete_sentence(text) and text == text.rstrip():  # trailing spaces go with what is dropped
                row.trace.events.append({"type": "close", "reason": reason, "keep_tokens": i,
                                         "dropped_tokens": len(tokens) - i, "at_token": len(tokens),
                                         "dropped_text": self._text(tokens[i:])})
                return Verdict(keep=steer, cut=i, finish="closed")
        return None

    def _repeat_start(self, rc: RowCorrection, tokens: list[int]) -> int | None:
        """Where the steered text's last sentence begins, when it just ended and says again
        a sentence said before it in the steered text; else None."""
        if len(tokens) - rc.steer_from < 2 or not complete_sentence(self._text(tokens[-1:])):
            return None
        text = self._text(tokens[rc.steer_from:])
        if not complete_sentence(text):
            return None
        parts = _SENTENCES.split(text.strip())
        if len(parts) < 2 or parts[-1] not in parts[:-1]:
            return None
        for i in range(len(tokens) - 1, rc.steer_from, -1):
            if self._text(tokens[i:]).strip() == parts[-1]:
                return i
        return None

    def _loop_cut(self, rc: RowCorrection, tokens: list[int]) -> int | None:
        """Where to cut a looping answer (None: not looping). Any answer ending in back-to-back
        copies keeps the first copy; a steered tail repeating an n-gram keeps what came before
        the n-gram's second occurrence (the first round of the loop, whole)."""
        cut = rc.guard.loop_cut(tokens)
        if cut is not None or rc.mode != "steer" or not rc.guard.looping(tokens[rc.steer_from:]):
            return cut
        n = self.settings.loop_ngram
        gram = tokens[-n:]
        starts = [i for i in range(rc.steer_from, len(tokens) - n + 1) if tokens[i:i + n] == gram]
        return starts[1] if len(starts) > 1 else len(tokens)
