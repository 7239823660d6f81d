"""A single row's chain forward and cache crop: the primitives a draft model or draft head
uses on its own cache, and the bench's profile of forward costs. (The engine runs chains of
every row in one forward; see :mod:`.engine`.)"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .candidates import StepOutput
from .hidden import forward_hidden


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
