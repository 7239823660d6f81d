"""Drafting with a trained head: greedy chains fed by the target's own features.

The drafter records the features itself, with hooks on the target (its final norm's output,
keyed by position and token id, from every target forward the decoder makes: prefill,
verification, candidate scoring), so any decoder can use it unchanged; features of a context
that changed (a rejected draft, a rollback) are dropped by position.
"""

from __future__ import annotations

import torch

from ...decoding.hidden import layer_module
from ...decoding.verify import crop_to
from ...errors import InputError, ModelError
from ..base import Drafter
from .network import DraftHead, target_decoder


class HeadDrafter(Drafter):
    """Greedy chains from a :class:`DraftHead`, fed by the target's recorded features.

    The head keeps its own key/value cache: each round it reads only the target features
    that are new since the last round (the tokens just verified) and drafts one token per
    one-position step. Drafted (predicted) entries are dropped from the cache before the
    next round; when the cache spans more than ``2 * window`` positions it is rebuilt from
    the last ``window`` (the head was trained on windows of that order).

    Chains are short by default (``max_k`` 2): on a CPU a verify forward over 4 new tokens
    costs about 1.35x one token against 1.14x for 3 (``rootdefense bench``'s profile), and a
    head whose first guess is right about half the time rarely gets a third token through."""

    name = "draft-head"
    needs_target_features = True  # batched decoders cannot feed it

    def __init__(self, target, head: DraftHead, window: int = 48, max_k: int = 2, start_k: int = 2):
        if not 1 <= start_k <= max_k:
            raise InputError(f"need 1 <= start_k <= max_k, got {start_k} and {max_k}")
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        self.head, self.window, self.max_k, self.start_k = head, window, max_k, start_k
        self.horizon = 2 * window + 64  # how far back features are kept (the cache spans <= 2 * window)
        decoder = target_decoder(target)
        self.rotary, self.embed = decoder.rotary_emb, target.get_input_embeddings()
        # the LM head rows of the draft vocabulary, gathered once
        self.lm_rows = target.get_output_embeddings().weight.detach()[head.vocab_ids].to(head.fc.weight.dtype)
        self.features: dict[tuple[int, int], torch.Tensor] = {}  # raw features (taps and final)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tapped: list[torch.Tensor] = []  # this forward's tapped layer outputs, in order
        tapped = [layer_module(target, t) for t in head.taps]  # the same mapping the decoders' probe hooks use
        if None in tapped:
            raise ModelError(f"this model's hidden states {list(head.taps)} cannot all be caught by hooks; "
                             "train a head without --taps for it")
        self._hooks = [decoder.register_forward_pre_hook(self._see_inputs, with_kwargs=True),
                       *(m.register_forward_hook(self._see_tap) for m in tapped),
                       decoder.norm.register_forward_hook(self._see_features)]
        self.reset()

    def _see_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[0] != 1:  # batched steering rows etc.: not this drafter's context
            self._pending = None
            return
        self._tapped = []
        pos = kwargs.get("position_ids")
        if pos is None:
            cache = kwargs.get("cache")
            start = cache.get_seq_length() if cache is not None else 0
            pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        self._pending = (ids[0].detach(), pos[0].detach())

    def _see_tap(self, module, args, output):
        if self._pending is not None:
            self._tapped.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    def _see_features(self, module, args, output):
        if self._pending is None:
            return
        ids, pos = self._pending
        self._pending = None
        feats = output[0].detach()
        if self.head.taps:
            tapped, self._tapped = self._tapped, []
            if len(tapped) != len(self.head.taps):  # a forward that skipped layers: nothing usable
                return
            feats = torch.cat([*tapped, feats], dim=-1)
        keep = pos >= pos.max() - self.horizon  # only recent positions can be asked for
        for p, t, f in zip(pos[keep].tolist(), ids[keep].tolist(), feats[keep], strict=True):
            self.features[(p, t)] = f

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # the interface ------------------------------------------------------------------------

    def reset(self) -> None:
        self.k = self.start_k
        self.features.clear()
        self._restart(0)

    def _restart(self, start: int) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.head.config)
        self._start = start  # the position of the cache's first entry
        self._keys: list[tuple[int, int]] = []  # (token at p, token at p + 1) of the true entries, in order

    def _step(self, feats: torch.Tensor, next_ids: list[int], first: int, raw: bool = True) -> torch.Tensor:
        """Extend the head's cache by positions ``first..`` (features ``feats`` (T, ·): the
        target's raw ones, or ``raw=False`` the head's own prediction, and the tokens after
        them); the predicted feature after the last."""
        dtype, device = self.head.fc.weight.dtype, feats.device
        feats = feats.to(dtype)
        if raw:
            feats = self.head.lift(feats)
        nxt = torch.tensor(next_ids, device=device)
        pos = torch.arange(first, first + len(next_ids), device=device)[None]
        pred = self.head.extend(feats[None], self.embed(nxt)[None].to(dtype), pos, self.rotary, self._cache)
        return pred[0, -1]

    @torch.no_grad()
    def propose(self, context: list[int], k: int) -> list[int]:
        """``context`` ends with the model's own next token (not yet forwarded); every token
        before it has a recorded feature when the decoder forwarded it."""
        k = min(k, self.k)
        n = len(context) - 1  # positions 0..n-1 were forwarded; context[n] is the pending own token
        if k < 1 or n < 1:
            return []
        # keep the cached true entries that still match the context; drop drafted ones
        keep = 0
        for i, (tok, nxt) in enumerate(self._keys):
            p = self._start + i
            if p >= n or context[p] != tok or context[p + 1] != nxt:
                break
            keep += 1
        if keep == 0 or n - self._start > 2 * self.window:
            self._restart(max(0, n - self.window))
        else:
            del self._keys[keep:]
            crop_to(self._cache, keep)
        first = self._start + len(self._keys)
        feats = []
        for p in range(first, n):
            f = self.features.get((p, context[p]))
            if f is None:  # only a gap-free run of features is usable: start again after the gap
                self._restart(p + 1)
                first, feats = p + 1, []
                continue
            feats.append(f)
        if not feats and not self._keys:
            return []
        self._prune(n)
        if feats:
            pred = self._step(torch.stack(feats), context[first + 1:n + 1], first)
            self._keys.extend((context[p], context[p + 1]) for p in range(first, n))
        else:  # nothing new since the last round (the own token was not forwarded yet): redo the last
            last = self.features.get((n - 1, context[n - 1]))
            if last is None:
                self._restart(n)
                return []
            self._keys.pop()
            crop_to(self._cache, len(self._keys))
            pred = self._step(last[None], [context[n]], n - 1)
            self._keys.append((context[n - 1], context[n]))
        draft: list[int] = []
        for i in range(k):
            token = int(self.head.vocab_ids[torch.argmax(pred.to(self.lm_rows.dtype) @ self.lm_rows.T)])
            draft.append(token)
            if i + 1 < k:
                pred = self._step(pred[None], [token], n + i, raw=False)
        return draft

    def _prune(self, n: int) -> None:
        low = n - self.horizon
        if len(self.features) > 4 * self.horizon * 8:
            self.features = {key: v for key, v in self.features.items() if key[0] >= low}

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        if n_proposed:
            self.k = min(self.max_k, self.k + 1) if n_accepted == n_proposed else max(1, self.k - 1)

    def describe(self) -> dict:
        return {"drafter": self.name, "window": self.window, "max_k": self.max_k,
                "draft_vocab": int(self.head.vocab_ids.numel())}
