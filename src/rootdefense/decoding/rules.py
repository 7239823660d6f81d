"""Decision rules: given scored candidates, choose the next token.

Each rule is a small object; the decoding loop never asks which one it holds. Candidates
arrive sorted by model probability (most probable first). With ``rng`` set the loop is
sampling, and rules sample among the candidates they allow; with ``rng=None`` they are
deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass
class Candidates:
    token_ids: torch.Tensor  # (m,) long
    logprobs: torch.Tensor  # (m,) model log-probabilities (temperature applied)
    harms: torch.Tensor  # (m,) probe harm probabilities in [0, 1]
    own: int  # index of the token the model alone would emit


def _sample(weights_log: torch.Tensor, rng: torch.Generator) -> int:
    probs = torch.softmax(weights_log, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng).item())


class Rule:
    name = "rule"

    def choose(self, c: Candidates, rng: torch.Generator | None = None) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"rule": self.name}


class PaperRule(Rule):
    """The paper's Eq. 9, read as intended: the least harmful of the top-k candidates by
    probability (the paper writes argmax with harmful=1, which would pick the most harmful)."""

    name = "paper"

    def __init__(self, k: int = 10):
        if k < 1:
            raise InputError(f"paper rule needs k >= 1, got {k}")
        self.k = k

    def choose(self, c, rng=None):
        k = min(self.k, len(c.token_ids))
        order = torch.argsort(c.logprobs, descending=True)[:k]
        return int(order[torch.argmin(c.harms[order])].item())

    def describe(self):
        return {"rule": self.name, "k": self.k}


class ThresholdRule(Rule):
    """Keep the model's own token when its harm is under tau; otherwise the most probable
    candidate under tau (sampled among them when sampling); otherwise the least harmful."""

    name = "threshold"

    def __init__(self, tau: float = 0.5):
        if not 0.0 < tau < 1.0:
            raise InputError(f"tau must lie strictly between 0 and 1, got {tau}")
        self.tau = tau

    def choose(self, c, rng=None):
        if c.harms[c.own] < self.tau:
            return c.own
        allowed = c.harms < self.tau
        if not bool(allowed.any()):
            return int(torch.argmin(c.harms).item())
        masked = c.logprobs.masked_fill(~allowed, -math.inf)
        if rng is None:
            return int(torch.argmax(masked).item())
        return _sample(masked, rng)

    def settled(self, harms: list[float], m: int) -> int | None:
        """The greedy choice among ``m`` candidates in probability order, the model's own
        token first, when only the first ``len(harms)`` are scored: the first one under tau
        (the own token, else the most probable harmless one), or, once all are scored and
        none is harmless, the least harmful; None while the choice is still open. Exactly
        :meth:`choose` on the whole pool, greedy (tested), so pools can be scored in stages."""
        for i, h in enumerate(harms):
            if h < self.tau:
                return i
        if len(harms) < m:
            return None
        return min(range(m), key=lambda i: harms[i])

    def describe(self):
        return {"rule": self.name, "tau": self.tau}


class WeightedRule(Rule):
    """Maximise log p + lambda * log(1 - h): a soft trade-off of fluency against harm."""

    name = "weighted"

    def __init__(self, lam: float = 2.0):
        if lam < 0:
            raise InputError(f"lambda must be >= 0, got {lam}")
        self.lam = lam

    def choose(self, c, rng=None):
        score = c.logprobs + self.lam * torch.log1p(-c.harms.clamp(max=1 - 1e-6))
        if rng is None:
            return int(torch.argmax(score).item())
        return _sample(score, rng)

    def describe(self):
        return {"rule": self.name, "lambda": self.lam}


RULES = {"paper": PaperRule, "threshold": ThresholdRule, "weighted": WeightedRule}


def make_rule(name: str, tau: float = 0.5, k: int = 10, lam: float = 2.0) -> Rule:
    if name == "paper":
        return PaperRule(k=k)
    if name == "threshold":
        return ThresholdRule(tau=tau)
    if name == "weighted":
        return WeightedRule(lam=lam)
    raise InputError(f"unknown rule '{name}'; choose one of {', '.join(RULES)}")
