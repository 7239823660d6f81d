"""Steering a flagged answer: candidates from the safety expert and the base model, each
scored by the probe on the base model's hidden state, and the choice among them."""

from __future__ import annotations

import math

import torch

BASE, EXPERT = "__base__", "expert"  # peft adapter names of a base row and an expert row


def amplified(lp_e: torch.Tensor, lp_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log of SafeDecoding's amplified distribution ``p_b + alpha (p_e - p_b)`` (negative
    values floored): the ranking of a steered opening, where the tokens the expert raised
    most over the base model come first. Unnormalised: only its order and, when sampling,
    its softmax matter."""
    p_e, p_b = lp_e.exp(), lp_b.exp()
    return (p_b + alpha * (p_e - p_b)).clamp(min=1e-30).log()


def union_pool(lp_e: torch.Tensor, lp_b: torch.Tensor, own: int, expert_top: int, base_top: int) -> torch.Tensor:
    """The expert's top tokens, then the base model's (and its own choice) not yet in,
    most expert-probable first."""
    ids = torch.cat([torch.topk(lp_e, expert_top).indices, torch.topk(lp_b, base_top).indices,
                     torch.tensor([own])])
    uniq = list(dict.fromkeys(ids.tolist()))
    uniq.sort(key=lambda t: -float(lp_e[t]))
    return torch.tensor(uniq, dtype=torch.long)


def steer_choice(pool, lp_e, lp_b, harms, tau: float, min_base_logprob: float, rng) -> int:
    """The expert's most probable candidate that the probe passes (harm < tau) and the base
    model finds plausible (log p >= floor); else any candidate the probe passes; else the
    least harmful. Sampling draws from the expert's distribution over the allowed set."""
    safe = harms < tau
    plausible = lp_b[pool] >= min_base_logprob
    for allowed in (safe & plausible, safe):
        if bool(allowed.any()):
            scores = lp_e[pool].masked_fill(~allowed, -math.inf)
            if rng is None:
                return int(torch.argmax(scores).item())
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=rng).item())
    return int(torch.argmin(harms).item())


def steer_stages(pool: torch.Tensor, lp_b: torch.Tensor, own_idx: int, floor: float, first: int,
                 greedy: bool) -> tuple[list[list[int]], list[int]]:
    """The stages in which a steered pool is scored, and the plausible candidates of the
    first. Greedy: the first ``first`` candidates the base model finds plausible (the pool
    runs from the expert's most probable down) and the model's own token, then the rest only
    when none of those passes the probe; the choice is the same as scoring the whole pool,
    since the first plausible candidate that passes comes before every plausible one left
    unscored. Sampling (or ``first`` 0): the whole pool at once."""
    m = len(pool)
    plausible = (lp_b[pool] >= floor).nonzero()[:, 0].tolist()[:first]
    head = sorted(set(plausible) | {own_idx})
    if not (greedy and plausible and len(head) < m):
        return [list(range(m))], plausible
    return [head, [i for i in range(m) if i not in head]], plausible
