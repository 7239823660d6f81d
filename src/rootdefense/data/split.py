"""Deterministic split by prompt text, so the same prompt never lands on two sides, in any
dataset, on any machine: 20% test, 10% validation (threshold calibration), 70% fit."""

from __future__ import annotations

import hashlib
import re


def _normal(prompt: str) -> str:
    return re.sub(r"\W+", " ", prompt.lower()).strip()


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha256(_normal(prompt).encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket < 2 else "val" if bucket == 2 else "fit"


def edgy_half(prompt: str) -> str:
    """The benign-but-edgy set is small, so it is halved rather than split 70/10/20: the
    'train' half teaches probes that edgy words are not harm; the 'eval' half measures
    over-refusal and is never trained on."""
    bucket = int(hashlib.sha256(("edgy:" + _normal(prompt)).encode()).hexdigest()[:8], 16) % 2
    return "train" if bucket == 0 else "eval"


SPLITS = ("all", "fit", "val", "test", "edgy-eval")  # what `rootdefense data export` can select


def in_split(prompt: str, split: str) -> bool:
    """Whether ``prompt`` belongs to ``split`` (one of :data:`SPLITS`; ``edgy-eval``: the
    benign-but-edgy set's held-out half)."""
    if split == "all":
        return True
    if split == "edgy-eval":
        return edgy_half(prompt) == "eval"
    return split_of(prompt) == split


def held_out(name: str, limit: int | None = None):
    """Examples of dataset ``name`` that no probe or expert trains on: the test split, or
    for the benign-but-edgy set its eval half. ``limit`` keeps the first ones."""
    from .loaders import load_dataset

    keep = (lambda p: edgy_half(p) == "eval") if name == "edgy" else (lambda p: split_of(p) == "test")
    rows = [e for e in load_dataset(name) if keep(e.prompt)]
    return rows[:limit] if limit else rows
