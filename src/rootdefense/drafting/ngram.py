"""Prompt lookup: draft by copying what followed the last n tokens earlier in the context.

Answers often quote the prompt (code, names, lists) or repeat themselves; when the last few
tokens occurred before, the tokens after that occurrence are a free, often right, guess.
"""

from __future__ import annotations

from ..errors import InputError
from .base import Drafter


class PromptLookupDrafter(Drafter):
    """Match the context's last n tokens (longest n first, ``max_ngram`` down to
    ``min_ngram``) against their most recent earlier occurrence and propose what followed.

    A match close to the end continues periodically (``a b a b`` drafts ``a b a b ...``).
    An index maps each n-gram to the position where it last ended; it grows with the
    context, and is rebuilt only when the context is not an extension of the last one (after
    a rejected or replaced token).

    The draft length adapts (``adaptive``): +2 after a fully accepted draft, -1 otherwise,
    within 1..``max_k``, starting at ``start_k``. A verify forward over a long chain costs
    about twice a one-token forward on a CPU (see ``rootdefense bench``'s profile), so long
    drafts only pay where copies keep being accepted.
    """

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_k: int = 10, adaptive: bool = True,
                 start_k: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise InputError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if max_k < 1:
            raise InputError(f"max_k must be >= 1, got {max_k}")
        if not 1 <= start_k <= max_k:
            raise InputError(f"need 1 <= start_k <= max_k, got {start_k} and {max_k}")
        self.max_ngram, self.min_ngram, self.max_k = max_ngram, min_ngram, max_k
        self.adaptive, self.start_k = adaptive, start_k
        self.reset()

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        if self.adaptive and n_proposed:
            self.k = min(self.max_k, self.k + 2) if n_accepted == n_proposed else max(1, self.k - 1)

    def reset(self) -> None:
        self.k = self.start_k if self.adaptive else self.max_k
        self._ids: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position of its last token
        self._indexed = 0  # n-grams ending before this position are in the index

    def _sync(self, context: list[int]) -> None:
        n = len(self._ids)
        if len(context) < n or context[:n] != self._ids:
            self.reset()
        self._ids = list(context)
        # Index every n-gram that ends before the last token: the last token's own n-grams
        # are the query, and a match must lie strictly earlier.
        for end in range(self._indexed, len(context) - 1):
            for size in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self._index[tuple(context[end - size + 1:end + 1])] = end
        self._indexed = max(self._indexed, len(context) - 1)

    def propose(self, context: list[int], k: int) -> list[int]:
        k = min(k, self.k)
        if k < 1 or not context:
            return []
        self._sync(context)
        for size in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            end = self._index.get(tuple(context[-size:]))
            if end is not None:
                return self._copy(context, end + 1, k)
        return []

    @staticmethod
    def _copy(context: list[int], start: int, k: int) -> list[int]:
        """k tokens copied from ``start`` on; a copy that reaches the end of the context
        goes on reading its own output, so a repeating loop is drafted for its full length."""
        out = context[start:start + k]
        period = len(context) - start
        while len(out) < k:
            out.append(out[len(out) - period])
        return out

    def fresh(self) -> PromptLookupDrafter:
        return PromptLookupDrafter(self.max_ngram, self.min_ngram, self.max_k, self.adaptive, self.start_k)

    def describe(self) -> dict:
        return {"drafter": self.name, "max_ngram": self.max_ngram, "min_ngram": self.min_ngram,
                "max_k": self.max_k, "adaptive": self.adaptive}
