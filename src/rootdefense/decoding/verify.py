"""Verification: one target forward over a drafted chain, and the acceptance rule that keeps
speculative decoding lossless.

The drafters here are deterministic, so the draft distribution q is a point mass on the
drafted token d. Speculative sampling's acceptance min(1, p(d)/q(d)) is then p(d), and the
residual max(0, p - q), renormalised, is p with d removed. The token kept at each position
is thus distributed exactly as p, the distribution the plain decoder samples from.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .candidates import StepOutput
from .config import GenerationConfig
from .hidden import forward_hidden
from .loop import own_choice, target_probs


def step_logprobs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Next-token log-probabilities with the temperature applied, on the CPU, as the plain
    decoder computes them."""
    temp = cfg.temperature if not cfg.greedy else 1.0
    return torch.log_softmax(logits / temp, dim=-1).cpu()


def verified_choice(logprobs: torch.Tensor, draft: int, cfg: GenerationConfig,
                    rng: torch.Generator | None) -> int:
    """The model's own token at a drafted position. Greedy: the argmax (the draft survives
    when it is the argmax). Sampling: the draft with probability p(draft), otherwise a sample
    from p with the draft removed."""
    if cfg.greedy:
        return own_choice(logprobs, cfg, rng)
    probs = target_probs(logprobs, cfg.top_p)
    if float(torch.rand(1, generator=rng)) < float(probs[draft]):
        return draft
    residual = probs.clone()
    residual[draft] = 0.0
    return int(torch.multinomial(residual / residual.sum(), 1, generator=rng).item())


@torch.no_grad()
def forward_chain(model, cache, token_ids: torch.Tensor, prefix_len: int, layer: int | None) -> StepOutput:
    """Run the chain ``token_ids`` (n,) causally after a cached prefix of ``prefix_len``
    tokens. Row i of the output holds the hidden state of token i (its harm) and the logits
    for the token after it. The cache grows by n entries; crop what is not kept."""
    n = int(token_ids.shape[0])
    device = token_ids.device
    out, hidden = forward_hidden(model, layer, input_ids=token_ids[None],
                                 position_ids=torch.arange(prefix_len, prefix_len + n, device=device)[None],
                                 cache=cache, use_cache=True)
    return StepOutput(logits=out.logits[0].float(), hidden=None if hidden is None else hidden[0].float())


def crop_to(cache, length: int) -> None:
    """Drop the cache entries past ``length`` (the rejected part of a verified chain)."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    try:
        cache.crop(-extra)
    except RuntimeError as exc:  # sliding-window layers past their window keep no past to go back to
        raise ModelError(
            f"this model's cache cannot be rolled back ({exc}); speculative decoding needs full-attention "
            "layers or a prompt shorter than the sliding window"
        ) from exc
