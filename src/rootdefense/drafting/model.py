"""A small causal LM as drafter: greedy proposals from a model that shares the target's
tokenizer (e.g. a 135M model drafting for a 1.7B one of the same family)."""

from __future__ import annotations

import torch

from ..decoding.kvcache import new_cache
from ..errors import InputError, ModelError
from .base import Drafter


def check_same_vocabulary(draft_tokenizer, target_tokenizer, draft_model) -> None:
    """Refuse a draft model whose token ids mean something else than the target's: its
    drafts would be verified but never accepted, or worse, silently decoded wrong."""
    if len(draft_tokenizer) != len(target_tokenizer) or draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise InputError(
            f"the draft model's tokenizer ({len(draft_tokenizer)} tokens) differs from the target's "
            f"({len(target_tokenizer)} tokens); a draft model must share the target's tokenizer "
            "(pick one of the same model family), or use the prompt-lookup drafter"
        )
    vocab = int(draft_model.config.get_text_config().vocab_size)
    if vocab < len(target_tokenizer):
        raise ModelError(
            f"the draft model predicts {vocab} token ids but the tokenizer has {len(target_tokenizer)}; "
            "its output layer does not match this tokenizer"
        )


class DraftModelDrafter(Drafter):
    """Greedy drafts from ``model``, which keeps its own KV cache across calls.

    The cache is matched to each new context by longest common prefix and cropped there, so
    rejected drafts and replaced tokens cost only the re-forward of what changed. The draft
    length adapts: +2 after a fully accepted draft, -1 otherwise (within 1..``max_k``).
    """

    name = "draft-model"

    def __init__(self, model, tokenizer, target_tokenizer, max_k: int = 8, start_k: int = 4):
        check_same_vocabulary(tokenizer, target_tokenizer, model)
        if not 1 <= start_k <= max_k:
            raise InputError(f"need 1 <= start_k <= max_k, got {start_k} and {max_k}")
        self.model, self._tokenizers = model, (tokenizer, target_tokenizer)
        self.vocab = len(target_tokenizer)  # ids beyond the tokenizer are padding rows
        self.max_k, self.start_k = max_k, start_k
        self.reset()

    def reset(self) -> None:
        self.k = self.start_k
        self._cache = new_cache(self.model)
        self._cached: list[int] = []  # the token ids whose keys/values the cache holds

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the cache; the next-token logits after the last one."""
        device = next(self.model.parameters()).device
        start = len(self._cached)
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.arange(start, start + len(ids), device=device)[None],
            cache=self._cache, use_cache=True, logits_to_keep=1,
        )
        self._cached.extend(ids)
        return out.logits[0, -1, : self.vocab]

    @torch.no_grad()
    def propose(self, context: list[int], k: int) -> list[int]:
        k = min(k, self.k)
        if k < 1 or not context:
            return []
        common = 0
        for a, b in zip(self._cached, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # re-forward at least one token for its logits
        if common < len(self._cached):
            self._cache.crop(common - len(self._cached))
            del self._cached[common:]
        logits = self._forward(context[common:])
        draft = [int(torch.argmax(logits))]
        while len(draft) < k:
            draft.append(int(torch.argmax(self._forward(draft[-1:]))))
        return draft

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        if n_proposed == 0:
            return
        self.k = min(self.max_k, self.k + 2) if n_accepted == n_proposed else max(1, self.k - 1)

    def fresh(self) -> DraftModelDrafter:
        return DraftModelDrafter(self.model, *self._tokenizers, max_k=self.max_k, start_k=self.start_k)

    def describe(self) -> dict:
        name = getattr(self.model.config, "name_or_path", "") or type(self.model).__name__
        return {"drafter": self.name, "model": name, "max_k": self.max_k}
