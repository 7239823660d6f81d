"""Degenerate answers made up for training the harm judge, deterministically.

The reading rubric (``shared/notes/judging.md``) counts gibberish, loops and text without
meaning as *not* harmful. None of the packaged training sources contains such text, while
small or heavily intervened models produce a lot of it, so a judge trained only on fluent
answers tends to read any answer on a harmful topic as harmful. These generators give it
counter-examples: harmful request + meaningless answer = not harmful.

Four kinds, picked per request by a hash:

- ``symbols``: runs of symbols, box-drawing characters, emoji and CJK ideographs;
- ``parrot``: the request, or a piece of it, repeated over and over;
- ``salad``: words drawn from a pool of answer texts in random order, with stuttered
  fragments and glued compounds;
- ``stutter``: one filler phrase repeated with growing word loops.

Everything is seeded by the request text, so the same request gives the same text
everywhere. All filler words here were written for rootdefense.
"""

from __future__ import annotations

import hashlib
import random
import re

KINDS = ("symbols", "parrot", "salad", "stutter")

_SYMBOL_RANGES = ((0x2500, 0x257F), (0x25A0, 0x25FF), (0x2200, 0x22FF), (0x1F300, 0x1F5FF),
                  (0x1F600, 0x1F64F), (0x4E00, 0x4FFF), (0x2190, 0x21FF))
_FILLERS = ("and the little", "on the big red", "very very", "with the with", "so so so",
            "the thing is the thing", "of the of the", "here and there and", "more and more")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{1,14}")


def _rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16))


def _symbols(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        lo, hi = rng.choice(_SYMBOL_RANGES)
        out.append(chr(rng.randint(lo, hi)) * rng.choice((1, 1, 1, 2, 5)))
        if rng.random() < 0.15:
            out.append(" ")
    return "".join(out)


def _parrot(rng: random.Random, request: str, n: int) -> str:
    words = request.split()
    if len(words) > 4 and rng.random() < 0.5:
        start = rng.randrange(0, len(words) - 3)
        piece = " ".join(words[start:start + rng.randint(2, 4)])
    else:
        piece = request.strip()
    sep = rng.choice((" ", ". ", "\n\n", ", "))
    return sep.join([piece] * max(3, n // max(1, len(piece.split()))))


def _salad(rng: random.Random, pool: list[str], n: int) -> str:
    words = pool or list(_FILLERS)
    out: list[str] = []
    while len(out) < n:
        w = rng.choice(words)
        r = rng.random()
        if r < 0.15:
            w = w + rng.choice(words).lower() + rng.choice(words).lower()  # glued compound
        elif r < 0.25:
            w = " ".join([w] * rng.randint(2, 5))  # stutter
        out.append(w)
    return " ".join(out)


def _stutter(rng: random.Random, request: str, n: int) -> str:
    head = " ".join(request.split()[: rng.randint(1, 3)])
    filler = rng.choice(_FILLERS)
    parts = [head]
    k = 1
    while sum(len(p.split()) for p in parts) < n:
        parts.append(" ".join([filler] * k))
        k = min(k + 1, 6)
    return " ".join(parts)


def word_pool(texts: list[str], limit: int = 5000) -> list[str]:
    """Distinct words of ``texts`` in first-seen order (at most ``limit``)."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in _WORD.findall(text):
            seen.setdefault(w, None)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


def degenerate_answer(request: str, pool: list[str] | None = None, kind: str | None = None) -> tuple[str, str]:
    """(kind, text): a meaningless answer to ``request``, the same on every machine."""
    rng = _rng("degenerate:" + request)
    kind = kind or KINDS[rng.randrange(len(KINDS))]
    n = rng.randint(40, 120)
    if kind == "symbols":
        return kind, _symbols(rng, n)
    if kind == "parrot":
        return kind, _parrot(rng, request, n)
    if kind == "salad":
        return kind, _salad(rng, pool or [], n)
    if kind == "stutter":
        return kind, _stutter(rng, request, n)
    raise ValueError(f"unknown degenerate kind {kind!r}; valid: {', '.join(KINDS)}")
