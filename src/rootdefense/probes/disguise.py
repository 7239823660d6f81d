"""Requests in disguise, for probes that read the intent beneath a wrapper.

A probe trained on plain requests learns what a plain harmful request looks like; inside a
persona, a fiction frame, a prefix injection or a jailbreak template its score drifts. Here
every attack family that wraps a request as text (written for rootdefense, or templates
from the installed jailbreak collections) wraps harmful and benign requests alike, so the
only difference left for a probe to learn is the request itself. Families are whole units:
measuring a probe on a family it was not trained on (leave one family out) tells how it
does on a template nobody has seen.
"""

from __future__ import annotations

import random

# attack families whose wrapping is text around the request (no optimisation, no prefill)
FAMILIES = ("roleplay", "fiction", "prefix-injection", "dan", "autodan", "inthewild")
PLAIN = "plain"


def wrap(family: str, prompt: str, index: int) -> str:
    """``prompt`` inside template ``index`` of ``family``, as the single user message."""
    from ..data.records import Example
    from ..evaluation.attacks import make_attack

    attacked = make_attack(family).apply(Example(id="wrap", prompt=prompt, harmful=False, source="wrap"),
                                         None, index)
    return attacked.messages[-1]["content"]


def disguised(rows: list[tuple], per_family: int, seed: int, families=FAMILIES) -> list[tuple]:
    """For each family, ``per_family`` harmful and ``per_family`` benign rows of ``rows``
    (``(prompt, harmful, source, split, family)``, family ``plain``) wrapped in it, each
    with its own template index; a wrapped row keeps its request's label, source and split
    (a test-split request stays on the test side in every wrapper)."""
    rng = random.Random(seed)
    plain = [r for r in rows if r[4] == PLAIN]
    out = []
    for family in families:
        for harmful in (True, False):
            side = [r for r in plain if r[1] == harmful]
            for i, r in enumerate(rng.sample(side, min(per_family, len(side)))):
                out.append((wrap(family, r[0], i), r[1], r[2], r[3], family))
    return out
