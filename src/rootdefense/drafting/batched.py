"""Batched speculative RDS: several prompts, each drafting and verifying its own chain, all
in one forward per round.

Every row of the batch does per round what :class:`~rootdefense.drafting.decoder.SpeculativeDecoder`
does for one prompt, and the forward that serves them all is shaped per row:

- a row that drafts sends its chain ``[own] + draft``: slot i sees the row's past and
  chain slots 0..i (causal), at position ``next + i``;
- a row that must decide a position exactly (its own token was harmful, or the last token
  was a correction) sends its candidate pool: every slot sees the row's past and itself,
  all at position ``next`` (as :mod:`~rootdefense.decoding.candidates` does for one row);
- slots past a row's width are padding and see only themselves.

A pool's chosen candidate is moved to the round's first slot, in place, so every row keeps
a prefix of its slots: a chain its verified part, a pool one slot. Rows keep different
numbers, so the cache is not cut per row: each row's 0/1 ``past`` mask marks the entries it
kept, and the others stay masked out for good. Position ids are given per row, so the holes
change nothing; columns no row kept are cropped (in a round of pools and one-token chains,
all but the first), and finished rows leave the batch. Greedy output equals the
single-stream decoder's for every row (tested).

Drafters are per row (one per prompt) and must draft from the context alone (prompt lookup,
a draft model); the draft head reads the target's single-stream features and is refused.

Greedy, a row deciding a position exactly sends its own token and the next candidates
first and the rest of its pool in a later round only while the rule's choice is open, as
the single-stream decoder stages them; a row that must wait keeps nothing that round.

Slots a round pays for anyway carry drafts (``fill``, on by default): when one row sends
its candidate pool, every row gets that many slots, so a row whose own drafter proposed
nothing (``--drafter lazy``, or no match) fills them with a prompt-lookup copy. The
forward's shape does not change, verification keeps only what the target would have
chosen, so answers are the same; rows just advance further in the rounds where a
neighbour is being corrected.
"""

from __future__ import annotations

import time

import torch

from ..decoding.batched import (
    _Row,
    _select_rows,
    batch_results,
    move_slots,
    prefill_batch,
)
from ..decoding.config import GenerationConfig
from ..decoding.hidden import forward_hidden
from ..decoding.loop import (
    Generation,
    candidate_pool,
    emit,
    end_reason,
    own_choice,
    sampling_rng,
)
from ..decoding.rules import Candidates, Rule, ThresholdRule
from ..decoding.verify import step_logprobs, verified_choice
from ..errors import InputError, ModelError
from .base import Drafter
from .decoder import FIRST_CANDIDATES, check_draft_settings, pool_stages
from .ngram import PromptLookupDrafter

# A batched round is as wide as its widest row, so a row scoring the rest of its pool in one
# stage (17 slots) makes every row pay 17 slots: 8 rows x 20 cost 11.7x a one-row forward on
# the bench's CPU against 1.9x for one token each. Smaller stages settle the threshold rule's
# choice as soon as a harmless candidate is scored (same choice, tested): on 8 held-out
# harmful prompts, stages 3 / 6 / 10 / 20 decoded 105 tokens/s against 82 for 3 / 20.
BATCH_STAGES = (6, 10)

MAX_FILL = 32  # the most slots a fill draft takes (a round is never widened for it)


class _SpecRow(_Row):
    def __init__(self, index: int, prompt: torch.Tensor, tokenizer, drafter: Drafter):
        super().__init__(index, int(prompt.shape[1]), tokenizer)
        self.context = prompt[0].tolist()
        self.drafter = drafter
        self.lp: torch.Tensor | None = None  # log-probs for the row's next position
        self.own: int | None = None  # the model's own next token, when already drawn
        self.exact = False  # decide the next position by candidate scoring
        self.slots: list[int] = []
        self.star = False  # this round's slots are alternatives (a pool), not a chain
        self.draft_len = 0
        self.watcher = None  # told of every committed token; True: the row leaves the batch
        self.pool: list[int] | None = None  # the candidate pool of the position being decided exactly
        self.pool_harms: list[float] = []  # harms of its first candidates, scored so far
        self.stages: list[int] = []  # bounds of the pool's scoring stages (:func:`pool_stages`)
        self.forced: int | None = None  # the choice, scored in an earlier round: forward it alone
        self.slot_start = 0  # the pool index of this round's first slot
        self.filler: Drafter | None = None  # drafts into slots a wider neighbour already paid for
        self.filled = False  # this round's draft came from the filler
        self.stats = {"forwards": 0, "rounds": 0, "drafted": 0, "accepted": 0, "exact_steps": 0, "filled": 0,
                      "candidates_scored": 0}


def _round_mask(past: torch.Tensor, rows: list[_SpecRow], width: int, dtype) -> torch.Tensor:
    """Additive 4D mask (B, 1, width, C + width) for one round (see the module text)."""
    bsz, c = past.shape
    allowed = torch.zeros((bsz, width, c + width), dtype=torch.bool, device=past.device)
    allowed[:, :, :c] = past.bool()[:, None, :]
    idx = torch.arange(width, device=past.device)
    allowed[:, idx, c + idx] = True
    causal = torch.tril(torch.ones((width, width), dtype=torch.bool, device=past.device))
    for b, row in enumerate(rows):
        n = len(row.slots)
        allowed[b, n:, :c] = False
        if not row.star:
            allowed[b, :n, c:c + n] = causal[:n, :n]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=past.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _trim(cache, past: torch.Tensor) -> torch.Tensor:
    """Drop trailing cache columns that no row kept; returns the trimmed ``past``."""
    used = past.any(dim=0).nonzero()
    keep = int(used[-1, 0]) + 1 if used.numel() else 0
    if keep < past.shape[1]:
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.shape[-2] != past.shape[1]:
                raise ModelError(f"{type(layer).__name__} cache layers are not supported by batched speculation")
            layer.keys = layer.keys[:, :, :keep]
            layer.values = layer.values[:, :, :keep]
        past = past[:, :keep]
    return past


class BatchSpeculativeDecoder:
    """Decode several prompts at once with drafts (one copy of ``drafter`` per prompt, from
    :meth:`Drafter.fresh`), an optional probe and an optional threshold rule."""

    def __init__(self, model, tokenizer, drafter: Drafter, probe=None, rule: Rule | None = None,
                 eos_token_ids: list[int] | None = None, max_draft: int = 8, fill: bool = True,
                 first_candidates: int = FIRST_CANDIDATES):
        if rule is not None and probe is None:
            raise ValueError("a decision rule needs a probe to score candidates")
        if rule is not None and not isinstance(rule, ThresholdRule):
            raise InputError(f"speculative decoding supports the threshold rule only (got '{rule.name}')")
        check_draft_settings(max_draft, first_candidates)
        if getattr(drafter, "needs_target_features", False):
            raise InputError(f"the {drafter.name} drafter reads the target's single-stream features and cannot "
                             "draft for a batch; use prompt lookup ('ngram') or a draft model for batches")
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.probe, self.rule, self.max_draft, self.fill = probe, rule, max_draft, fill
        self.first_candidates = first_candidates  # 0: score a whole pool in one round
        self.eos = set(eos_token_ids or [])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (eos_token_ids or [0])[0])

    def _harmful(self, harm: float | None) -> bool:
        return self.rule is not None and harm >= self.rule.tau

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], cfg: GenerationConfig, watch=None) -> list[Generation | None]:
        """As :meth:`rootdefense.decoding.batched.BatchDecoder.generate` (same ``watch``)."""
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        rng = sampling_rng(cfg)
        layer = self.probe.layer if self.probe is not None else None
        rows = [_SpecRow(i, p, self.tokenizer, self.drafter.fresh()) for i, p in enumerate(prompts)]
        for r in rows:
            r.watcher = watch(r.index) if watch is not None else None
            r.filler = PromptLookupDrafter(adaptive=False, max_k=MAX_FILL) if self.fill else None
        cache, logits, past, t_prefill = prefill_batch(self.model, prompts, self.pad_id, device)
        for b, r in enumerate(rows):
            r.lp = step_logprobs(logits[b], cfg)
        next_pos = past.sum(-1)
        live = list(rows)
        t1 = time.perf_counter()
        while live:
            # propose: each row's chain (own token + draft) or, where it must, its candidate pool
            for r in live:
                if r.own is None:
                    r.own = own_choice(r.lp, cfg, rng)
                r.star = r.exact and self.rule is not None
                if r.star:
                    self._pool_slots(r, cfg, rng)
                else:
                    room = min(self.max_draft, cfg.max_new_tokens - len(r.tokens) - 1)
                    draft = r.drafter.propose(r.context + [r.own], room)[:room] if room > 0 else []
                    r.slots, r.draft_len, r.filled = [r.own] + draft, len(draft), False
            width = max(len(r.slots) for r in live)
            if width > 1:  # slots paid for by the widest row: rows without a draft fill theirs
                for r in live:
                    if r.filler is not None and not r.star and len(r.slots) == 1:
                        room = min(width - 1, cfg.max_new_tokens - len(r.tokens) - 1)
                        draft = r.filler.propose(r.context + [r.own], room)[:room] if room > 0 else []
                        r.slots, r.draft_len, r.filled = [r.own] + draft, len(draft), bool(draft)
            slots = torch.tensor([r.slots + [r.slots[0]] * (width - len(r.slots)) for r in live], device=device)
            pos = torch.stack([next_pos[b] + (torch.zeros(width, dtype=torch.long, device=device) if r.star
                                              else torch.arange(width, device=device)) for b, r in enumerate(live)])
            # verify / score: one forward for every row
            step, hidden = forward_hidden(self.model, layer, input_ids=slots, position_ids=pos, cache=cache,
                                          use_cache=True, attention_mask=_round_mask(past, live, width, self.model.dtype))
            harms = self.probe.score(hidden.float()).cpu() if layer is not None else None
            # choose / accept: per row, which slots it keeps
            kept = torch.zeros((len(live), width), dtype=past.dtype, device=device)
            moved, chosen = [], []
            for b, r in enumerate(live):
                lps = step_logprobs(step.logits[b, :len(r.slots)].float(), cfg)
                h = None if harms is None else harms[b, :len(r.slots)].tolist()
                if r.star:  # the chosen candidate moves to the round's first slot: no hole is left
                    j = self._exact(r, lps, h, rng, cfg)
                    if j:
                        moved.append(b)
                        chosen.append(j)
                    if j is not None:  # else the choice is still open: the row keeps nothing this round
                        kept[b, 0] = 1
                else:
                    kept[b, :self._verify(r, lps, h, rng, cfg)] = 1
                r.stats["forwards"] += 1
            move_slots(cache, past.shape[1], width, torch.tensor(moved, dtype=torch.long, device=device),
                       torch.tensor(chosen, dtype=torch.long, device=device))
            past = _trim(cache, torch.cat([past, kept], dim=1))
            next_pos = next_pos + kept.sum(-1)
            keep = [b for b, r in enumerate(live) if not r.done]
            if len(keep) < len(live):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                _select_rows(cache, idx)
                past, next_pos = past[idx], next_pos[idx]
                live = [live[b] for b in keep]
                if live:
                    past = _trim(cache, past)
        return batch_results(rows, cfg, t_prefill, time.perf_counter() - t1, extra=lambda r: {
            **r.stats, "mean_accepted": round(r.stats["accepted"] / max(r.stats["rounds"], 1), 3),
            "tokens_per_forward": round(len(r.tokens) / max(r.stats["forwards"], 1), 3)})

    # per-row decisions ------------------------------------------------------------------

    def _commit(self, r: _SpecRow, token: int, own: int, lp, harm, own_harm, candidates: int, cfg) -> bool:
        step, _ = emit(r.detok, token, own, lp, harm, own_harm, candidates)
        r.trace.steps.append(step)
        r.tokens.append(token)
        r.context.append(token)
        reason = end_reason(token, self.eos, r.detok.text, cfg)
        if reason:
            r.trace.finish_reason = reason
        r.done = reason is not None or len(r.tokens) >= cfg.max_new_tokens
        if r.watcher is not None and r.watcher.update(r.tokens, step.harm, loops=r.trace.finish_reason != "eos"):
            r.done, r.handed_over = True, True
        return r.done

    def _pool_slots(self, r: _SpecRow, cfg, rng) -> None:
        """This round's slots for a row deciding its position exactly: greedy, its own token
        and the next most probable candidates first, the rest of the pool in the next round
        only if the choice is still open (as the single-stream decoder stages them)."""
        if r.pool is None:
            r.pool, r.pool_harms, r.forced = candidate_pool(r.lp, r.own, cfg).tolist(), [], None
            r.stages = pool_stages(len(r.pool), r.pool.index(r.own), self.first_candidates, rng is None,
                                   more=BATCH_STAGES)
        a = len(r.pool_harms)
        if r.forced is not None:
            r.slots = [r.pool[r.forced]]
        else:
            r.slots = r.pool[a:next(b for b in r.stages if b > a)]
            r.stats["candidates_scored"] += len(r.slots)
        r.slot_start, r.draft_len = a, 0

    def _exact(self, r: _SpecRow, lps, harms, rng, cfg) -> int | None:
        """The row's candidates were scored: once the rule's choice is settled, commit it and
        return its slot; None while it is open (more candidates, or the choice forwarded alone,
        next round)."""
        own_idx = r.pool.index(r.own)
        if r.forced is not None:
            j, slot = r.forced, 0
        else:
            r.pool_harms += harms
            if len(r.stages) > 2:
                j = self.rule.settled(r.pool_harms, len(r.pool))
            else:
                pool = torch.tensor(r.pool)
                j = self.rule.choose(Candidates(pool, r.lp[pool], torch.tensor(r.pool_harms), own_idx), rng)
            if j is None:
                return None
            slot = j - r.slot_start
            if not 0 <= slot < len(r.slots):  # the least harmful was scored in an earlier round
                r.forced = j
                return None
        r.stats["exact_steps"] += 1
        self._commit(r, r.pool[j], r.own, r.lp, r.pool_harms[j], r.pool_harms[own_idx], len(r.pool), cfg)
        r.lp, r.own, r.exact = lps[slot], None, j != own_idx  # after a correction, decide the next one exactly too
        r.pool, r.forced = None, None
        return slot

    def _verify(self, r: _SpecRow, lps, harms, rng, cfg) -> int:
        """The row's chain was run: keep its verified, harmless prefix (slots 0..n-1; n returned)."""
        r.stats["rounds"] += 1
        r.stats["drafted"] += r.draft_len
        lp, matched, n = r.lp, 0, 0
        own = r.own
        stopped = False
        for i, token in enumerate(r.slots):
            if i > 0:
                lp = lps[i - 1]
                own = verified_choice(lp, token, cfg, rng)
                if own != token:
                    stopped = True
                    break
                matched += 1
            if self._harmful(None if harms is None else harms[i]):
                r.exact, stopped = True, True  # decide this position exactly next round
                break
            n += 1
            h = None if harms is None else harms[i]
            if self._commit(r, token, token, lp, h, h, 1, cfg):
                break
        r.stats["accepted"] += matched
        if r.filled:
            r.stats["filled"] += r.draft_len
        else:  # the row's own drafter learns from its own proposals only
            r.drafter.accepted(r.draft_len, matched)
        if stopped:  # the next position's distribution and own token are known already
            r.lp, r.own = lp, own
        else:
            r.lp, r.own = lps[n - 1], None
        return n
