"""The degeneration guard: loop detectors over an answer's tokens."""

from __future__ import annotations

from collections import Counter


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

    def max_cut(self) -> int:
        """The most tokens :meth:`loop_cut` can ever take off the end of an answer: text
        older than that is out of its reach (the stream may release it)."""
        periodic = max(((max(self.repeats, -(-self.span // p)) - 1) * p for p in range(1, self.max_period + 1)),
                       default=0)
        return max(periodic, self.near_window)
