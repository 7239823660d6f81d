"""Batch generation: several prompts decoded together, each exactly as :class:`Decoder`
decodes it alone (propose -> score -> choose -> commit), one forward per step for the whole
batch.

- Prompts are left-padded to one length; every row keeps its own position ids, and its
  padding is masked out of every attention, so a row's tokens do not depend on its
  neighbours (greedy output equals the single-prompt decoder's; tested).
- Each step scores every row's candidate pool in the same forward: row b's candidates sit
  side by side at row b's next position, each seeing row b's past and itself (a 4D mask,
  as in :mod:`candidates`). Pools of different sizes are padded with masked-out slots.
- A row that finishes (eos, stop string, length) leaves the batch: its cache rows are
  dropped, so the remaining rows decode at the cost of a smaller batch.
"""

from __future__ import annotations

import time

import torch

from ..errors import ModelError
from .config import GenerationConfig
from .hidden import forward_hidden
from .kvcache import new_cache
from .loop import (
    Detokenizer,
    Generation,
    candidate_pool,
    decode_timings,
    emit,
    end_reason,
    final_text,
    own_choice,
    sampling_rng,
)
from .rules import Candidates, Rule
from .trace import Trace


class _Row:
    """One prompt's state inside the batch."""

    def __init__(self, index: int, prompt_len: int, tokenizer):
        self.index, self.prompt_len = index, prompt_len
        self.detok = Detokenizer(tokenizer)
        self.trace = Trace()
        self.tokens: list[int] = []
        self.done = False
        self.handed_over = False


def _pad_left(prompts: list[torch.Tensor], pad_id: int, device):
    """(B, L) ids and 0/1 mask, each prompt right-aligned."""
    width = max(int(p.shape[1]) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        n = int(p.shape[1])
        ids[b, width - n:] = p[0].to(device)
        mask[b, width - n:] = 1
    return ids, mask


def prefill_batch(model, prompts: list[torch.Tensor], pad_id: int, device):
    """Forward the left-padded prompts into a fresh cache: (cache, last logits (B, vocab),
    the (B, T) 0/1 mask of real tokens, seconds)."""
    ids, past = _pad_left(prompts, pad_id, device)
    positions = (past.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=past, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return cache, out.logits[:, -1].float(), past, time.perf_counter() - t0


def _step_mask(past: torch.Tensor, sizes: list[int], width: int, dtype) -> torch.Tensor:
    """Additive 4D mask (B, 1, width, C + width): row b's slot j sees row b's real past
    (``past`` is the (B, C) 0/1 mask) and itself; slots past ``sizes[b]`` see only
    themselves (padding, never chosen)."""
    bsz, c = past.shape
    allowed = torch.zeros((bsz, width, c + width), dtype=torch.bool, device=past.device)
    allowed[:, :, :c] = past.bool()[:, None, :]
    idx = torch.arange(width, device=past.device)
    allowed[:, idx, c + idx] = True
    for b, n in enumerate(sizes):
        allowed[b, n:, :c] = False
    mask = torch.zeros(allowed.shape, dtype=dtype, device=past.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def move_slots(cache, c: int, width: int, rows: torch.Tensor, chosen: torch.Tensor) -> None:
    """Copy slot ``chosen[i]`` of batch row ``rows[i]`` (cache column ``c + chosen[i]``) to
    column ``c``, in place; the caller then keeps column ``c`` and crops what follows."""
    if rows.numel() == 0:
        return
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.shape[-2] != c + width:
            raise ModelError(f"{type(layer).__name__} cache layers are not supported by batch candidate scoring")
        keys[rows, :, c] = keys[rows, :, c + chosen]
        values[rows, :, c] = values[rows, :, c + chosen]


def _keep_slots(cache, c: int, width: int, chosen: torch.Tensor) -> None:
    """Shrink every cache layer from C + width entries to C + 1, keeping each row's chosen
    slot at position C (moved in place: the cache is not copied)."""
    moved = (chosen != 0).nonzero()[:, 0]
    move_slots(cache, c, width, moved, chosen[moved])
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :c + 1], layer.values[:, :, :c + 1]


def batch_results(rows: list[_Row], cfg: GenerationConfig, t_prefill: float, elapsed: float,
                  extra=None) -> list[Generation | None]:
    """One Generation per row (None for a row handed over), timed as part of the batch;
    ``extra(row)`` adds a row's own timing fields."""
    total = sum(len(r.tokens) for r in rows if not r.handed_over)
    out: list[Generation | None] = []
    for r in rows:
        if r.handed_over:
            out.append(None)
            continue
        timings = decode_timings(t_prefill, elapsed, len(r.tokens))
        timings.update(batch_size=len(rows), batch_tokens=total,
                       batch_tokens_per_s=round(total / elapsed, 2) if elapsed > 0 else None,
                       **(extra(r) if extra is not None else {}))
        out.append(Generation(text=final_text(r.detok.text, r.trace, cfg), token_ids=r.tokens, trace=r.trace,
                              prompt_tokens=r.prompt_len, timings=timings))
    return out


def _select_rows(cache, keep: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[keep]
        layer.values = layer.values[keep]


class BatchDecoder:
    """Decode several prompts at once with an optional probe and decision rule (any rule:
    every step scores candidates exactly, nothing is drafted)."""

    def __init__(self, model, tokenizer, probe=None, rule: Rule | None = None, eos_token_ids: list[int] | None = None):
        if rule is not None and probe is None:
            raise ValueError("a decision rule needs a probe to score candidates")
        self.model, self.tokenizer, self.probe, self.rule = model, tokenizer, probe, rule
        self.eos = set(eos_token_ids or [])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (eos_token_ids or [0])[0])

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], cfg: GenerationConfig, watch=None) -> list[Generation | None]:
        """``prompts``: (1, T_i) id tensors. Returns one Generation per prompt, in order.

        ``watch`` (optional) makes a watcher per row: ``watch(i).update(tokens, harm)`` (row i) is
        told of every committed token and returns True when the row must leave the batch
        (e.g. the correcting decoder's monitor flagged it); such rows come back as None,
        for the caller to answer on its own."""
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        rng = sampling_rng(cfg)
        layer = self.probe.layer if self.probe is not None else None
        rows = [_Row(i, int(p.shape[1]), self.tokenizer) for i, p in enumerate(prompts)]
        watchers = [watch(r.index) for r in rows] if watch is not None else None
        cache, logits, past, t_prefill = prefill_batch(self.model, prompts, self.pad_id, device)
        next_pos = past.sum(-1)  # (B,) each row's next position id
        live = list(rows)  # rows still decoding, in cache-row order
        temp = cfg.temperature if not cfg.greedy else 1.0
        t1 = time.perf_counter()
        while live:
            # propose: each row's own token and candidate pool
            lps = torch.log_softmax(logits / temp, dim=-1).cpu()
            owns, pools = [], []
            for b in range(len(live)):
                own = own_choice(lps[b], cfg, rng)
                owns.append(own)
                pools.append(candidate_pool(lps[b], own, cfg) if self.rule is not None else torch.tensor([own]))
            sizes = [len(p) for p in pools]
            width = max(sizes)
            slots = torch.stack([torch.cat([p, p[:1].expand(width - len(p))]) for p in pools]).to(device)
            # score: every row's candidates in one forward
            c = past.shape[1]
            mask = _step_mask(past, sizes, width, self.model.dtype)
            step, hidden = forward_hidden(self.model, layer, input_ids=slots,
                                          position_ids=next_pos[:, None].expand(-1, width), cache=cache,
                                          attention_mask=mask, use_cache=True)
            harms = self.probe.score(hidden.float()).cpu() if layer is not None else None
            # choose
            chosen = []
            for b, row in enumerate(live):
                own_idx = int((pools[b] == owns[b]).nonzero()[0, 0])
                if self.rule is None:
                    j = own_idx
                else:
                    hb = harms[b, :sizes[b]]
                    j = self.rule.choose(Candidates(pools[b], lps[b][pools[b]], hb, own_idx), rng)
                chosen.append(j)
                self._commit(row, pools[b], j, own_idx, lps[b], None if harms is None else harms[b], cfg)
                if watchers is not None and watchers[row.index].update(
                        row.tokens, row.trace.steps[-1].harm, loops=row.trace.finish_reason != "eos"):
                    row.done, row.handed_over = True, True
            # commit: keep each row's chosen slot, then drop finished rows
            pick = torch.tensor(chosen, device=device)
            _keep_slots(cache, c, width, pick)
            logits = step.logits[torch.arange(len(live), device=device), pick].float()
            past = torch.cat([past, torch.ones((len(live), 1), dtype=past.dtype, device=device)], dim=1)
            next_pos = next_pos + 1
            keep = [b for b, row in enumerate(live) if not row.done]
            if len(keep) < len(live):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                _select_rows(cache, idx)
                logits, past, next_pos = logits[idx], past[idx], next_pos[idx]
                live = [live[b] for b in keep]
        return batch_results(rows, cfg, t_prefill, time.perf_counter() - t1)

    def _commit(self, row: _Row, pool, j: int, own_idx: int, lp, harms, cfg) -> None:
        token, own = int(pool[j]), int(pool[own_idx])
        step, _ = emit(row.detok, token, own, lp, None if harms is None else float(harms[j]),
                       None if harms is None else float(harms[own_idx]), len(pool))
        row.trace.steps.append(step)
        row.tokens.append(token)
        reason = end_reason(token, self.eos, row.detok.text, cfg)
        if reason:
            row.trace.finish_reason, row.done = reason, True
        elif len(row.tokens) >= cfg.max_new_tokens:
            row.done = True
