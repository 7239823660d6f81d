"""Generation settings, validated once at the edge and trusted inside the loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InputError

MAX_NEW_TOKENS_LIMIT = 32768
MAX_CANDIDATES = 256


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # defense
    top_m: int = 20  # candidates scored per step
    candidate_top_p: float = 1.0  # optional nucleus cut on the candidate pool

    def __post_init__(self):
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(msg):
            raise InputError(msg)

        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            bad(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 10.0:
            bad(f"temperature must be in [0, 10] (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.candidate_top_p <= 1.0:
            bad(f"candidate_top_p must be in (0, 1], got {self.candidate_top_p}")
        if not isinstance(self.top_m, int) or not 1 <= self.top_m <= MAX_CANDIDATES:
            bad(f"top_m (candidates per step) must be an integer in 1..{MAX_CANDIDATES}, got {self.top_m!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")

    def to_dict(self) -> dict:
        return asdict(self)
