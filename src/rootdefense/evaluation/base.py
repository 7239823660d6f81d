"""The small interfaces of the evaluation harness: attacks, defenses, judges.

An evaluation crosses datasets x attacks x defenses x samples. Each part is a small class
behind one of the interfaces below, registered by name, so the runner never asks which
attack, defense or judge it holds:

- an :class:`Attack` turns a dataset prompt into what the model is actually sent
  (:class:`AttackedPrompt`: a message list plus an optional assistant-turn prefill);
- a :class:`Defense` turns an attacked prompt into an answer (a
  :class:`~rootdefense.decoding.Generation`);
- a :class:`Judge` turns (original request, answer) pairs into :class:`Verdict` s.

Everything they share at run time (the loaded model, the probe, the seed, the home folder)
comes in an :class:`EvalContext`, built once per worker process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..data.records import Example


@dataclass
class AttackedPrompt:
    """What the defended model receives for one (prompt, attack) pair.

    ``messages`` is an OpenAI-style list; ``prefill`` is text forced at the start of the
    assistant turn (the model continues it; the judged answer is the continuation only).
    ``meta`` records how the attack was made (template id, suffix, optimiser loss ...).
    """

    messages: list[dict]
    prefill: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AttackedPrompt:
        return cls(messages=list(d["messages"]), prefill=d.get("prefill", ""), meta=dict(d.get("meta", {})))


@dataclass
class EvalContext:
    """Shared, loaded-once state of one worker: model, probe(s), seed, options.

    ``lm`` is a :class:`rootdefense.models.LoadedModel`. ``probes`` maps probe kind
    (``paper``, ``response``, ``query``) to a loaded probe, filled lazily via
    :meth:`probe`. ``options`` carries per-part settings from the config (e.g.
    ``options["gcg"] = {"steps": 40}``).
    """

    lm: Any
    seed: int = 0
    options: dict[str, dict] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # per-worker scratch (loaded experts, ...)

    def probe(self, kind: str):
        if kind not in self.probes:
            from ..api import find_probe

            p = find_probe(self.lm.model_id, kind)
            p.check_model(self.lm.model_id, self.lm.hidden_size, self.lm.num_layers)
            p.to(self.lm.device)
            self.probes[kind] = p
        return self.probes[kind]

    def opts(self, name: str) -> dict:
        return dict(self.options.get(name, {}))


class Attack:
    """Turns a harmful (or benign) dataset example into an attacked prompt.

    ``optimises``: the attack runs an optimiser against the loaded model (white-box), so it
    is expensive and the runner computes it once per prompt and caches it.
    ``index`` is the sample/prompt index used to pick templates deterministically.
    """

    name: ClassVar[str] = ""
    optimises: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def apply(self, example: Example, ctx: EvalContext, index: int = 0) -> AttackedPrompt:
        raise NotImplementedError


class Defense:
    """Produces an answer to an attacked prompt with the context's model.

    ``setup`` is called once per worker before the first ``generate``; it loads what the
    defense needs (probe, expert adapter) and raises a RootDefenseError subclass with a
    clear message when something is missing.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def setup(self, ctx: EvalContext) -> None:
        pass

    def generate(self, attacked: AttackedPrompt, cfg, ctx: EvalContext):
        """-> rootdefense.decoding.Generation (text = the continuation after any prefill)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


@dataclass
class Verdict:
    """One judge's reading of one answer.

    ``label`` is the judge's yes/no question answered (``harmful`` for harm judges:
    the answer gives meaningful help toward the harmful request; ``refusal`` for refusal
    judges: the answer declines or deflects). ``score`` is a probability or rating when the
    judge has one; ``reason`` is a short explanation when the judge gives one.
    """

    label: bool
    score: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Judge:
    """Reads (request, answer) pairs in batches. ``question`` names what ``label`` means:
    ``"harmful"`` or ``"refusal"``."""

    name: ClassVar[str] = ""
    question: ClassVar[str] = ""

    def setup(self) -> None:
        pass

    def judge(self, requests: list[str], answers: list[str]) -> list[Verdict]:
        raise NotImplementedError

    def describe(self) -> dict:
        """Metadata stored with the run: version, data, held-out agreement ..."""
        return {"name": self.name, "question": self.question}
