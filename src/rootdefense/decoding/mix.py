"""SafeDecoding's mix (Xu et al., 2024) as a selector: for the first ``m`` tokens, amplify
the safety expert's preferences over the base model's on the tokens both rank highly; then
the base model decodes alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .config import GenerationConfig
from .sampling import own_choice


def top_k_intersection(p_base: torch.Tensor, p_expert: torch.Tensor, c: int) -> tuple[torch.Tensor, int]:
    """Tokens in both top-k sets for the smallest k >= c at which there are at least c of them.

    Equivalent to growing k from c one at a time: a token is in both top-k sets iff its
    worse rank of the two is below k. Ties in probability rank by token id. Returns the
    token ids (ascending) and k.
    """
    vocab = p_base.shape[0]
    c = min(c, vocab)
    positions = torch.arange(vocab, device=p_base.device)
    worse = torch.zeros(vocab, dtype=torch.long, device=p_base.device)
    for p in (p_base, p_expert):
        rank = torch.empty(vocab, dtype=torch.long, device=p_base.device)
        rank[torch.sort(p, descending=True, stable=True).indices] = positions
        worse = torch.maximum(worse, rank)
    k = max(c, int(torch.kthvalue(worse, c).values) + 1)
    return (worse < k).nonzero().flatten(), k


def safedecoding_probs(p_base: torch.Tensor, p_expert: torch.Tensor, pool: torch.Tensor,
                       alpha: float) -> torch.Tensor | None:
    """SafeDecoding's distribution over ``pool``: p_base + alpha (p_expert - p_base), negative
    scores clipped to zero, renormalised. None when no token keeps a positive score."""
    score = (p_base[pool] + alpha * (p_expert[pool] - p_base[pool])).clamp(min=0.0)
    total = float(score.sum())
    return score / total if total > 0 else None


def safedecoding_choice(p_base: torch.Tensor, p_expert: torch.Tensor, alpha: float, c: int,
                        cfg: GenerationConfig, rng: torch.Generator | None) -> tuple[int, int]:
    """The token SafeDecoding emits (argmax, or a sample with the config's top-p) and the
    size of the pool it came from. Falls back to the expert's top token."""
    pool, _ = top_k_intersection(p_base, p_expert, c)
    probs = safedecoding_probs(p_base, p_expert, pool, alpha)
    if probs is None:
        return int(torch.argmax(p_expert)), len(pool)
    return int(pool[own_choice(probs.log(), cfg, rng)]), len(pool)


@dataclass
class SafeDecodingMix:
    """``m``: tokens decided by the mix; ``alpha``: how strongly the expert's preference is
    amplified; ``c``: the smallest shared candidate pool; ``expert``: the SharedExpert."""

    expert: object
    m: int = 2
    alpha: float = 3.0
    c: int = 5

    def __post_init__(self):
        if not isinstance(self.m, int) or self.m < 0:
            raise InputError(f"safedecoding m must be a non-negative integer, got {self.m!r}")
        if not isinstance(self.c, int) or self.c < 1:
            raise InputError(f"safedecoding c must be a positive integer, got {self.c!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise InputError(f"safedecoding alpha must be a non-negative number, got {self.alpha!r}")

    def choose(self, lp_base: torch.Tensor, lp_expert: torch.Tensor, cfg: GenerationConfig, rng) -> tuple[int, int]:
        return safedecoding_choice(lp_base.exp(), lp_expert.exp(), self.alpha, self.c, cfg, rng)
