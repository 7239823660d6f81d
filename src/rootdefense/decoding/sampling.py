"""How a token is drawn from the model's next-token distribution: the undefended choice,
the candidate pool a rule chooses from, and the acceptance rule that keeps speculation
lossless. Every decision in the engine goes through these functions."""

from __future__ import annotations

import torch

from .config import GenerationConfig


def step_logprobs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Next-token log-probabilities with the temperature applied, on the CPU."""
    temp = cfg.temperature if not cfg.greedy else 1.0
    return torch.log_softmax(logits / temp, dim=-1).cpu()


def sampling_rng(cfg: GenerationConfig) -> torch.Generator | None:
    """A request's own generator (seeded by its config); None when greedy. Each row of a
    batch samples with its own, so a sampled answer does not depend on its neighbours."""
    if cfg.greedy:
        return None
    rng = torch.Generator(device="cpu")
    rng.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    return rng


def target_probs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The distribution the undefended model samples from: the nucleus ``top_p`` of
    ``exp(logprobs)``, renormalised (speculative sampling verifies against it too)."""
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_p[keep]
        probs = filtered
    return probs / probs.sum()


def own_choice(logprobs: torch.Tensor, cfg: GenerationConfig, rng) -> int:
    """The token the undefended model emits: argmax, or a sample with top-p."""
    if cfg.greedy:
        return int(torch.argmax(logprobs).item())
    return int(torch.multinomial(target_probs(logprobs, cfg.top_p), 1, generator=rng).item())


def candidate_pool(logprobs: torch.Tensor, own: int, cfg: GenerationConfig) -> torch.Tensor:
    """Top-m token ids by probability (optionally nucleus-cut), with the model's own token
    always included; most probable first."""
    top = torch.topk(logprobs, cfg.top_m)
    ids = top.indices
    if cfg.candidate_top_p < 1.0:
        p = top.values.exp()
        keep = torch.cumsum(p, 0) - p < cfg.candidate_top_p
        keep[0] = True
        ids = ids[keep]
    if not bool((ids == own).any()):
        ids = torch.cat([ids, torch.tensor([own], device=ids.device)])
    return ids


def verified_choice(logprobs: torch.Tensor, draft: int, cfg: GenerationConfig,
                    rng: torch.Generator | None) -> int:
    """The model's own token at a drafted position. Greedy: the argmax (the draft survives
    when it is the argmax). Sampling: the draft with probability p(draft), otherwise a sample
    from p with the draft removed.

    The drafters are deterministic, so the draft distribution q is a point mass on the
    drafted token d. Speculative sampling's acceptance min(1, p(d)/q(d)) is then p(d), and the
    residual max(0, p - q), renormalised, is p with d removed: the kept token is distributed
    exactly as p, the distribution undrafted decoding samples from."""
    if cfg.greedy:
        return own_choice(logprobs, cfg, rng)
    probs = target_probs(logprobs, cfg.top_p)
    if float(torch.rand(1, generator=rng)) < float(probs[draft]):
        return draft
    residual = probs.clone()
    residual[draft] = 0.0
    return int(torch.multinomial(residual / residual.sum(), 1, generator=rng).item())
