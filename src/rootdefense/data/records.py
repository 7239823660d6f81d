"""Plain records shared by every dataset loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One prompt (optionally with an answer) from a dataset.

    ``harmful`` labels the *text a probe sees*: for a bare prompt it says whether the
    request is harmful; for a prompt + answer pair it says whether the pair as a whole
    is harmful (a harmful request answered with a refusal is ``harmful=False``).

    ``answer_kind`` is ``"comply"``, ``"refuse"``, ``"benign"`` or ``None`` (no answer).
    ``meta`` holds per-source fields (original ids, categories, reference answers); the
    class is frozen but, because of ``meta``, not hashable.
    """

    id: str
    prompt: str
    harmful: bool
    source: str
    answer: str | None = None
    answer_kind: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what it is."""

    name: str
    harmful: bool
    package: str  # pip spec, e.g. "pyrit==1.1.0"; "" for data written by rootdefense
    path: str  # file (or glob) relative to the package folder
    licence: str
    description: str
