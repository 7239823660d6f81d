"""The monitor that flags an answer as harmful from its tokens' harm scores, and the gate
that picks a stricter monitor for requests the query probe reads as harmful."""

from __future__ import annotations


def trajectory(harm: float, query: float, blend: float) -> float:
    """A token's monitor score: its harm mixed with its request's query score by ``blend``."""
    return harm if not blend else (1 - blend) * harm + blend * query


class RecoveryMonitor:
    """Flags an answer when ``k`` of its last ``window`` tokens score at or above ``tau``.

    A token's score is its harm, or with ``blend`` > 0 a trajectory score: ``(1 - blend) *
    harm + blend * query``, ``query`` being the request's query-probe score. The request's
    intent, read beneath any wrapper, then lowers the evidence the answer must show: a
    compliant but still vague opening to a request that reads as harmful is caught, while a
    request that reads as benign needs more harm than before."""

    def __init__(self, tau: float, window: int, k: int, query: float = 0.0, blend: float = 0.0):
        self.tau, self.window, self.k = tau, window, k
        self.query, self.blend = query, blend
        self.harms: list[float] = []

    def reset(self, keep: int = 0) -> None:
        self.harms = self.harms[:keep]

    def score(self, harm: float) -> float:
        return trajectory(harm, self.query, self.blend)

    def update(self, harm: float, final: bool = False) -> bool:
        """Whether the answer is flagged after a token of ``harm``; ``final``: the token ends
        the answer and is read as a verdict on all of it (its score alone flags it)."""
        self.harms.append(harm)
        if final and self.score(harm) >= self.tau:
            return True
        recent = self.harms[-self.window:]
        return sum(self.score(h) >= self.tau for h in recent) >= self.k


def gate_score(query_probe, hidden) -> float:
    """The query probe's harm score of a request from its last token's hidden state (H,)."""
    return float(query_probe.score(hidden.float()[None])[0])
