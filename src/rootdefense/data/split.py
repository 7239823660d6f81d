"""Deterministic split by prompt text, so the same prompt never lands on two sides, in any
dataset, on any machine: 20% test, 10% validation (threshold calibration), 70% fit. The
benign-but-edgy set is halved instead (:func:`edgy_half`), the benign-but-alarming set
split 50/10/40 (:func:`alarming_part`) and its fit-only companion 90/10 (:func:`more_alarming_part`),
each with its own salt."""

from __future__ import annotations

import hashlib
import re


def _normal(prompt: str) -> str:
    return re.sub(r"\W+", " ", prompt.lower()).strip()


def _bucket(prompt: str, n: int, salt: str = "") -> int:
    """A fixed bucket in 0..n-1 for ``prompt``: sha256 of the salt and the normalised text."""
    return int(hashlib.sha256((salt + _normal(prompt)).encode()).hexdigest()[:8], 16) % n


def split_of(prompt: str) -> str:
    bucket = _bucket(prompt, 10)
    return "test" if bucket < 2 else "val" if bucket == 2 else "fit"


def edgy_half(prompt: str) -> str:
    """The benign-but-edgy set is small, so it is halved rather than split 70/10/20: the
    'train' half teaches probes that edgy words are not harm; the 'eval' half measures
    over-refusal and is never trained on."""
    bucket = _bucket(prompt, 2, "edgy:")
    return "train" if bucket == 0 else "eval"


def alarming_part(prompt: str) -> str:
    """The benign-but-alarming set (:mod:`rootdefense.data.alarming`) measures over-refusal,
    so it keeps a large test part: about 50% 'fit' (may teach a defense that harmless senses
    of alarming words are not harm), 10% 'val' (calibration), 40% 'test' (never tuned on)."""
    bucket = _bucket(prompt, 10, "alarming:")
    return "fit" if bucket < 5 else "val" if bucket == 5 else "test"


def more_alarming_part(prompt: str) -> str:
    """The second benign-but-alarming set (:mod:`rootdefense.data.alarming_more`) only
    teaches: about 90% 'fit', 10% 'val'. It has no test part; over-refusal is measured on
    the first set's test part, which no prompt of this set repeats."""
    return "val" if _bucket(prompt, 10, "alarming-more:") == 0 else "fit"


_OWN_PARTS = {"alarming": alarming_part, "alarming-more": more_alarming_part}  # sets split apart from the rest


def part_of(prompt: str, dataset: str | None = None) -> str:
    """'fit', 'val' or 'test' for a prompt of ``dataset``: the benign-but-alarming sets by
    :func:`alarming_part` and :func:`more_alarming_part`, every other set by :func:`split_of`."""
    return _OWN_PARTS.get(dataset, split_of)(prompt)


SPLITS = ("all", "fit", "val", "test", "edgy-eval", "alarming-test")  # what `rootdefense data export` can select


def in_split(prompt: str, split: str) -> bool:
    """Whether ``prompt`` belongs to ``split`` (one of :data:`SPLITS`; ``edgy-eval``: the
    benign-but-edgy set's held-out half; ``alarming-test``: the benign-but-alarming set's
    test part)."""
    if split == "all":
        return True
    if split == "edgy-eval":
        return edgy_half(prompt) == "eval"
    if split == "alarming-test":
        return alarming_part(prompt) == "test"
    return split_of(prompt) == split


def held_out(name: str, limit: int | None = None):
    """Examples of dataset ``name`` that no probe or expert trains on: the test split, for
    the benign-but-edgy set its eval half, for the benign-but-alarming set its test part
    (none for its fit-only companion ``alarming-more``).
    ``limit`` keeps the first ones."""
    from .loaders import load_dataset

    if name == "edgy":
        rows = [e for e in load_dataset(name) if edgy_half(e.prompt) == "eval"]
    else:
        rows = [e for e in load_dataset(name) if part_of(e.prompt, name) == "test"]
    return rows[:limit] if limit else rows
