"""Streamers: where an answer's text goes while it is decoded.

A streamer receives committed text only: text that no later step can withdraw. Without
correction every committed token is final (each is decided before it is emitted). With
rds-expert, the correction hook says how far back it may still roll an answer back
(:meth:`rootdefense.correction.Correction.final_len`), and the engine holds the text after
that point until it becomes final: answer rollback holds a watched answer to its end (or to
the rollback); sentence rollback holds text after the last sentence end that left the
monitor's window; the loop guard holds the last ``max_cut`` tokens (it may cut a loop back to
its first round: 128 tokens with the tuned settings).
Text that may be the start of a stop string is held too, so a stop string never reaches a
streamer; a character split across tokens is released whole. The pieces a streamer
receives always add up to the answer's final text.
"""

from __future__ import annotations

from collections.abc import Callable


class Streamer:
    """Receives an answer as it becomes final."""

    def put(self, text: str, steps: list) -> None:
        """``text``: the next piece of the final answer (may be empty when only ``steps``,
        the trace records of the tokens that became final, are new)."""

    def end(self, generation) -> None:
        """The answer is complete (``generation``: the whole result)."""


class TextStreamer(Streamer):
    """Calls ``on_text(piece)`` for every non-empty piece of final text."""

    def __init__(self, on_text: Callable[[str], None], on_end: Callable | None = None):
        self.on_text, self.on_end = on_text, on_end

    def put(self, text: str, steps: list) -> None:
        if text:
            self.on_text(text)

    def end(self, generation) -> None:
        if self.on_end is not None:
            self.on_end(generation)


def stop_overlap(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin one of ``stops``."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
