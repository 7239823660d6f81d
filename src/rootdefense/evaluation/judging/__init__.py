"""Judges of (request, answer) pairs, by name: ``refusal``, ``harm``, ``llm``.

- ``refusal`` (question ``refusal``): refusal-phrase matching with jailbreakeval's GCG /
  HarmBench phrase lists (:class:`~.refusal.RefusalJudge`);
- ``harm`` (question ``harmful``): the primary attack-success judge, a logistic regression
  over MiniLM embeddings of request and answer, trained from PyRIT's human-labelled scorer
  evaluations, UncensorBench and ShareGPT (:class:`~.harm.HarmJudge`; its labelled data in
  :mod:`.harm_data`, the embeddings in :mod:`.embedding`);
- ``llm`` (question ``harmful``): a chat model applying rootdefense's rubric, local
  (transformers) or behind an OpenAI-compatible endpoint (:class:`~.llm.LLMJudge`).

Build one with :func:`make_judge`; options are the judge class's keyword arguments (the
evaluation config's ``options.<judge>`` block). Importing this package is cheap: torch,
transformers and scikit-learn load on first use.
"""

from __future__ import annotations

from ...errors import InputError
from ..base import Judge
from .harm import (
    HarmJudge,
    HarmModel,
    JudgeError,
    ensure_harm_judge,
    harm_judge_dir,
    train_harm_judge,
)
from .llm import LLMJudge, OpenAIChatBackend, TransformersBackend, parse_verdict
from .refusal import RefusalJudge

JUDGES: dict[str, type[Judge]] = {
    RefusalJudge.name: RefusalJudge,
    HarmJudge.name: HarmJudge,
    LLMJudge.name: LLMJudge,
}


def make_judge(name: str, **opts) -> Judge:
    """A judge by registry name, built with ``opts`` (nothing heavy loads before ``setup``)."""
    if name not in JUDGES:
        raise InputError(f"unknown judge '{name}'; valid judges: {', '.join(JUDGES)}")
    return JUDGES[name](**opts)


__all__ = [
    "JUDGES",
    "HarmJudge",
    "HarmModel",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "OpenAIChatBackend",
    "RefusalJudge",
    "TransformersBackend",
    "ensure_harm_judge",
    "harm_judge_dir",
    "make_judge",
    "parse_verdict",
    "train_harm_judge",
]
