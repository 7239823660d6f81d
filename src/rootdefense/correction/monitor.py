"""The monitor that flags an answer as harmful from its tokens' harm scores, and the gate
that picks a stricter monitor for requests the query probe reads as harmful."""

from __future__ import annotations


class RecoveryMonitor:
    """Flags an answer when ``k`` of its last ``window`` tokens score at or above ``tau``."""

    def __init__(self, tau: float, window: int, k: int):
        self.tau, self.window, self.k = tau, window, k
        self.harms: list[float] = []

    def reset(self, keep: int = 0) -> None:
        self.harms = self.harms[:keep]

    def update(self, harm: float) -> bool:
        self.harms.append(harm)
        recent = self.harms[-self.window:]
        return sum(h >= self.tau for h in recent) >= self.k


def gate_score(query_probe, hidden) -> float:
    """The query probe's harm score of a request from its last token's hidden state (H,)."""
    return float(query_probe.score(hidden.float()[None])[0])
