"""Per-token record of what the defense saw and did; the data behind the trace page."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TokenStep:
    """One decoding step.

    ``original_*`` is what the model alone would have emitted at this step (its greedy
    token, or its sample under the same random draw); ``replaced`` says the rule chose
    something else. ``harm`` is the probe's harm probability (0..1) of the emitted token's
    hidden state; None when decoding undefended.
    """

    token_id: int
    token: str
    prob: float
    harm: float | None
    original_id: int
    original: str
    original_prob: float
    original_harm: float | None
    replaced: bool
    candidates: int = 1
    source: str = "base"  # which model proposed the emitted token: "base" or "expert"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trace:
    steps: list[TokenStep] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "degenerate" | "closed" | "withheld" (correction.hook)
    events: list[dict] = field(default_factory=list)  # rollbacks, corrections, degeneration stops
    gate: dict | None = None  # rds-expert with a gate: the request's query score and the monitor chosen

    @property
    def replaced(self) -> int:
        return sum(s.replaced for s in self.steps)

    def summary(self) -> dict:
        harms = [s.harm for s in self.steps if s.harm is not None]
        return {
            "tokens": len(self.steps),
            "replaced": self.replaced,
            "max_harm": max(harms) if harms else None,
            "mean_harm": sum(harms) / len(harms) if harms else None,
            "finish_reason": self.finish_reason,
            "flags": sum(e.get("reason") == "harm" for e in self.events),
            "rollbacks": sum(e.get("reason") == "harm" and e.get("type") in ("rollback", "correction")
                             for e in self.events),
            "degeneration_stops": sum(e.get("reason") == "degeneration" for e in self.events),
            "loop_restarts": sum(e.get("reason") == "loop" and e.get("type") != "close" for e in self.events),
            "closed": next((e["reason"] for e in self.events if e.get("type") == "close"), None),  # loop | length | eos
            "withheld": any(e.get("type") == "withhold" for e in self.events),
            "prefill_retracted": any(e.get("retracted_prefill") for e in self.events),
            "strict_monitor": None if self.gate is None else self.gate["strict"],
            **({"suspect_request": self.gate["suspect"]} if self.gate and "suspect" in self.gate else {}),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "steps": [s.to_dict() for s in self.steps], "events": self.events,
                "gate": self.gate}

    @classmethod
    def from_dict(cls, data: dict) -> Trace:
        steps = [TokenStep(**s) for s in data.get("steps", [])]
        return cls(steps=steps, finish_reason=data.get("summary", {}).get("finish_reason", "length"),
                   events=list(data.get("events", [])), gate=data.get("gate"))
