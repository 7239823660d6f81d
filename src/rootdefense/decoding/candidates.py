"""Exact candidate scoring: all candidate next tokens in ONE forward on the cached prefix.

Each candidate is an extra position that attends to the prefix and to itself only, at the
same position id, so its hidden state and next-token logits equal those of a full
recompute of ``prefix + [candidate]``. After the choice, the chosen candidate's cache
entry is moved into place and the others are dropped; nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError
from .hidden import forward_hidden


@dataclass
class StepOutput:
    logits: torch.Tensor  # (m, vocab): next-token logits after each candidate
    hidden: torch.Tensor | None  # (m, hidden) at the probe layer, or None


def candidate_mask(prefix_len: int, m: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive 4D mask (1, 1, m, prefix_len + m): row j sees the prefix and column
    prefix_len + j. Additive floats work for both eager and SDPA attention."""
    allowed = torch.zeros(m, prefix_len + m, dtype=torch.bool, device=device)
    allowed[:, :prefix_len] = True
    idx = torch.arange(m, device=device)
    allowed[idx, prefix_len + idx] = True
    mask = torch.zeros(m, prefix_len + m, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.no_grad()
def forward_candidates(model, cache, token_ids: torch.Tensor, prefix_len: int,
                       layer: int | None) -> StepOutput:
    """Run ``token_ids`` (m,) as m alternative next tokens after a cached prefix of
    ``prefix_len`` tokens. The cache grows by m entries; call :func:`keep_candidate`."""
    m = int(token_ids.shape[0])
    device = token_ids.device
    kwargs = {}
    if m > 1:
        kwargs["attention_mask"] = candidate_mask(prefix_len, m, model.dtype, device)
    out, hidden = forward_hidden(model, layer, input_ids=token_ids[None],
                                 position_ids=torch.full((1, m), prefix_len, dtype=torch.long, device=device),
                                 cache=cache, use_cache=True, **kwargs)
    return StepOutput(logits=out.logits[0].float(), hidden=None if hidden is None else hidden[0].float())


def keep_candidate(cache, prefix_len: int, m: int, j: int) -> None:
    """Shrink the cache from ``prefix_len + m`` entries to ``prefix_len + 1``, keeping
    candidate ``j``'s keys and values at position ``prefix_len``."""
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.shape[-2] != prefix_len + m:
            raise ModelError(
                f"{type(layer).__name__} cache layers are not supported by candidate scoring "
                "(sliding-window or recurrent caches past their window); use a model with full "
                "attention or a prompt shorter than its window"
            )
        if j != 0:
            keys[:, :, prefix_len] = keys[:, :, prefix_len + j]
            values[:, :, prefix_len] = values[:, :, prefix_len + j]
        layer.keys = keys[:, :, : prefix_len + 1]
        layer.values = values[:, :, : prefix_len + 1]
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they have seen
            layer.cumulative_length = prefix_len + 1


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, layer: int | None = None) -> StepOutput:
    """Forward the prompt (1, T) into ``cache``; return last-position logits (1, vocab)."""
    out, hidden = forward_hidden(model, layer, input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return StepOutput(logits=out.logits[0, -1:].float(), hidden=None if hidden is None else hidden[0, -1:].float())
