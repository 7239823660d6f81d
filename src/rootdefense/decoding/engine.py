"""The generation engine: one decoding loop for every defense and baseline.

Each step runs the method for every row of a running batch in ONE forward:

- **propose**: a row sends a chain, the model's own next token followed by its drafter's
  guess (nothing drafted: the own token alone), or, where a position must be decided
  exactly, candidate tokens from a pool (:mod:`.pools`);
- **score**: the forward gives every slot's hidden state, which the probe turns into harm,
  and the logits after it;
- **choose**: a chain keeps its tokens while they are the model's own choice (lossless
  verification, :func:`.sampling.verified_choice`) and, under the threshold rule, harmless;
  a pool's selector (a rule, or rds-expert's steering) settles on a candidate;
- **commit**: the kept tokens join the answer; the correction hook (rds-expert) may then
  rewind the row, and stopping criteria end it.

The parts are swappable: a drafter (none, prompt lookup, draft head, draft model), a
probe, a rule (paper, threshold, weighted), SafeDecoding's mix, a correction hook, and a
streamer per request. A single stream is a batch of one. Rows join between steps (a
prefill of their own, left-padded into the batch cache) and leave when they finish or are
cancelled, each with its own settings (max tokens, temperature, seed, stop strings): the
primitive a server's continuous batching needs. A row that correction rolls back leaves
and joins again with an expert row beside it, so rds-expert steers in place while the
other rows go on.

Greedy answers do not depend on the batch: every row attends to its own past only, at its
own positions (tested against the single stream). Sampled answers neither: each request
samples with its own seeded generator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..correction.steering import BASE, EXPERT, amplified, steer_choice, steer_stages, union_pool
from ..correction.suspicion import token_surprisal
from ..errors import InputError
from . import batchcache
from .config import GenerationConfig
from .generation import Detokenizer, Generation, decode_timings, emit, end_reason, final_text
from .hidden import forward_hidden, forward_layers
from .kvcache import new_cache
from .mix import SafeDecodingMix
from .pools import BATCH_STAGES, FIRST_CANDIDATES, PoolPlan, rule_plan
from .rules import Rule, ThresholdRule
from .sampling import own_choice, sampling_rng, step_logprobs, verified_choice
from .streamer import Streamer, stop_overlap
from .trace import Trace

if TYPE_CHECKING:
    from ..correction import Correction

MAX_FILL = 32  # the most slots a fill draft takes (a round is never widened for it)


@dataclass
class Request:
    """One answer to decode. ``prompt``: token ids; ``query_len``: how many of them are the
    request (default: all), the rest an opening forced into the answer (an assistant
    prefill); ``streamer`` receives the answer's text as it becomes final."""

    prompt: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    query_len: int | None = None
    streamer: Streamer | None = None

    def __post_init__(self):
        if not self.prompt:
            raise InputError("a request needs at least one prompt token")
        if self.query_len is not None and not 1 <= self.query_len <= len(self.prompt):
            raise InputError(f"query_len must lie in 1..{len(self.prompt)} (the prompt's length), got {self.query_len}")


class Row:
    """A request's state inside the engine."""

    def __init__(self, rid: int, request: Request, tokenizer, drafter, filler):
        self.id, self.request = rid, request
        self.prompt = list(request.prompt)
        self.query_len = request.query_len or len(self.prompt)
        self.cfg, self.streamer = request.config, request.streamer
        self.rng = sampling_rng(self.cfg)
        self.detok = Detokenizer(tokenizer)
        self.trace = Trace()
        self.tokens: list[int] = []
        self.drafter, self.filler = drafter, filler
        self.mix_pool = 1  # SafeDecoding: the size of the pool the mix chose from
        self.lp = self.lp_e = None  # next-token log-probabilities: base model, expert row
        self.own: int | None = None  # the model's own next token, once drawn
        self.exact = False  # decide the next position from a pool (after a harmful own token or a replacement)
        self.steering = False  # rds-expert: every position is steered from a pool
        self.twin = False  # an expert row sits beside this row in the cache
        self.plan: PoolPlan | None = None
        self.slots: list[int] = []
        self.draft_len, self.filled = 0, False
        self.corr = None  # rds-expert: the row's correction state
        self.rewind: tuple[int, bool] | None = None  # rds-expert: (keep, retract prefill), applied after the step
        self.done = False
        self.result: Generation | None = None
        self.released, self.released_steps = "", 0  # what the streamer has received
        self.t_join, self.t_prefill = time.perf_counter(), 0.0
        self.stats = {"forwards": 0, "rounds": 0, "drafted": 0, "accepted": 0, "exact_steps": 0, "filled": 0,
                      "candidates_scored": 0}

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def pooled(self) -> bool:
        return self.plan is not None


class Engine:
    """A running batch over one model and one defense configuration; see the module text.

    ``add`` a request, ``step`` until it is done (or ``run`` to the end), ``cancel`` one."""

    def __init__(self, model, tokenizer, *, probe=None, rule: Rule | None = None, drafter=None, max_draft: int = 8,
                 first_candidates: int = FIRST_CANDIDATES, fill: bool = True, correction: Correction | None = None,
                 mix: SafeDecodingMix | None = None, eos_token_ids: list[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.probe, self.rule, self.drafter, self.max_draft = probe, rule, drafter, max_draft
        self.first = first_candidates if drafter is not None else 0  # no drafter: the reference, every pool whole
        self.fill, self.correction, self.mix = fill, correction, mix
        self.expert = correction.expert if correction is not None else (mix.expert if mix is not None else None)
        self.eos = set(eos_token_ids or [])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (eos_token_ids or [0])[0])
        self.device = next(model.parameters()).device
        # every step scores a pool when nothing is drafted, or when the rule may replace a harmless token
        self.every_step = rule is not None and (drafter is None or not isinstance(rule, ThresholdRule))
        self.layer = probe.layer if probe is not None else None
        self.live: list[Row] = []
        self.pending: list[Row] = []
        self.cache = None
        self.past = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (cache rows, columns) 0/1
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._ids = 0

    # ------------------------------------------------------------------ rows in and out

    def add(self, request: Request) -> Row:
        """Queue a request; it joins the batch at the next step."""
        drafter = None
        if self.drafter is not None:
            if not getattr(self.drafter, "needs_target_features", False):
                try:
                    drafter = self.drafter.fresh()
                except NotImplementedError:
                    drafter = None
            if drafter is None:  # a drafter that cannot be copied drafts for one row at a time
                if self.live or self.pending:
                    raise InputError(f"the {self.drafter.name} drafter cannot draft for a batch; use prompt "
                                     "lookup ('ngram') or a draft model for batches")
                drafter = self.drafter
            drafter.reset()
        filler = None
        if self.fill and self.drafter is not None:
            from ..drafting.ngram import PromptLookupDrafter  # the drafters build on the engine's primitives

            filler = PromptLookupDrafter(adaptive=False, max_k=MAX_FILL)
        row = Row(self._ids, request, self.tokenizer, drafter, filler)
        row.twin = self.mix is not None and self.mix.m > 0  # SafeDecoding reads the expert from the start
        self._ids += 1
        self.pending.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop ``row`` now: it leaves the batch (its cache rows are freed) before the next step."""
        if row.done:
            return
        if row in self.pending:
            self.pending.remove(row)
        else:
            self._leave([row])
        self._finish(row, "cancelled")
        self._conclude(row)

    @property
    def busy(self) -> bool:
        return bool(self.live or self.pending)

    def run(self) -> None:
        while self.busy:
            self.step()

    def cache_rows(self) -> int:
        """How many cache rows the batch holds (a row and, while it steers, its expert row)."""
        return int(self.past.shape[0])

    def _layout(self) -> list[tuple[Row, int, int | None]]:
        """Each live row with its base and expert cache rows."""
        out, i = [], 0
        for r in self.live:
            out.append((r, i, i + 1 if r.twin else None))
            i += 2 if r.twin else 1
        return out

    def _leave(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        keep = [i for r, b, t in self._layout() if id(r) not in gone for i in ((b,) if t is None else (b, t))]
        if len(keep) < self.cache_rows():
            self.past = batchcache.compact(self.cache, batchcache.select(self.cache, self.past, keep)) if keep else \
                self.past[:0, :0]
            self.next_pos = self.next_pos[torch.tensor(keep, dtype=torch.long, device=self.device)]
            if not keep:
                self.cache = None
        self.live = [r for r in self.live if id(r) not in gone]

    def _drop_twin(self, row: Row) -> None:
        keep = [i for r, b, t in self._layout() for i in ((b,) if t is None or r is row else (b, t))]
        self.past = batchcache.select(self.cache, self.past, keep)
        self.next_pos = self.next_pos[torch.tensor(keep, dtype=torch.long, device=self.device)]
        row.twin, row.lp_e = False, None

    def _forward(self, adapters: list[str] | None, layer: int | list[int] | None, **kwargs):
        """One forward of the model (``adapters``: per cache row, base or expert) and the
        hidden states of ``layer`` (one, or a list of them)."""
        fwd = forward_layers if isinstance(layer, list) else forward_hidden
        if adapters is None:
            return fwd(self.model, layer, **kwargs)
        with self.expert.active() as peft_model:
            return fwd(self.model, layer, runner=lambda **kw: peft_model(adapter_names=adapters, **kw), **kwargs)

    def _surprisal(self, final: torch.Tensor, ids: list[int], query_len: int) -> list[float]:
        """-log p of the request's tokens 1 .. query_len - 1 under the model, from one row's
        final hidden states (left-padded to ``final``'s length)."""
        offset = final.shape[0] - len(ids)
        return token_surprisal(self.model.get_output_embeddings()(final[offset: offset + query_len - 1]),
                               ids[1:query_len])

    def _admit(self) -> None:
        """Prefill the rows waiting to join, in one left-padded forward, into the batch."""
        rows, self.pending = self.pending, []
        ids = [r.context for r in rows for _ in range(2 if r.twin else 1)]
        twins = any(r.twin for r in rows)
        width = max(map(len, ids))
        past = torch.zeros((len(ids), width), dtype=torch.long, device=self.device)
        batch = torch.full((len(ids), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, x in enumerate(ids):
            batch[i, width - len(x):] = torch.tensor(x, device=self.device)
            past[i, width - len(x):] = 1
        kwargs = {"input_ids": batch, "use_cache": True, "logits_to_keep": 1}
        if not bool(past.all()):
            kwargs.update(attention_mask=past, position_ids=(past.cumsum(-1) - 1).clamp(min=0))
        gated = self.correction is not None and self.correction.settings.reads_request
        gate_layer = self.correction.query_probe.layer if gated else None
        suspect = gated and self.correction.reads_prompt
        cache = new_cache(self.model)
        t0 = time.perf_counter()
        adapters = [a for r in rows for a in ((BASE, EXPERT) if r.twin else (BASE,))] if twins else None
        final = None
        with torch.no_grad():
            if suspect:
                out, (hidden, final) = self._forward(adapters, [gate_layer, self.model.config.num_hidden_layers],
                                                     cache=cache, **kwargs)
            else:
                out, hidden = self._forward(adapters, gate_layer, cache=cache, **kwargs)
        logits = out.logits[:, -1].float()
        elapsed = time.perf_counter() - t0
        i = 0
        for r in rows:
            r.t_prefill += elapsed
            r.lp = step_logprobs(logits[i], r.cfg)
            r.lp_e = step_logprobs(logits[i + 1], r.cfg) if r.twin else None
            if self.correction is not None and r.corr is None:
                surprisal = None if final is None else self._surprisal(final[i], ids[i], r.query_len)
                r.corr = self.correction.start(None if hidden is None else hidden[i, width - len(ids[i]) + r.query_len - 1],
                                               surprisal)
            i += 2 if r.twin else 1
        lengths = past.sum(-1)
        if self.cache is None:
            self.cache, self.past, self.next_pos = cache, past, lengths
        else:
            self.past = batchcache.merge(self.cache, self.past, cache, past)
            self.next_pos = torch.cat([self.next_pos, lengths])
        self.live += rows

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One forward for every live row (after admitting the waiting ones); returns the
        rows that finished in it."""
        if self.pending:
            self._admit()
        if not self.live:
            return []
        # propose: each row's chain, or the slots of the pool it decides
        for r in list(self.live):
            self._propose(r)
        layout = self._layout()
        width = max(len(r.slots) for r in self.live)
        if width > 1:  # slots paid for by the widest row: rows without a draft fill theirs
            for r in self.live:
                if r.filler is not None and not r.pooled and len(r.slots) == 1:
                    room = min(width - 1, r.cfg.max_new_tokens - len(r.tokens) - 1)
                    draft = r.filler.propose(r.context + [r.slots[0]], room)[:room] if room > 0 else []
                    r.slots, r.draft_len, r.filled = [r.slots[0]] + draft, len(draft), bool(draft)
        cache_rows = [(r, i) for r, b, t in layout for i in ((b,) if t is None else (b, t))]
        slots = torch.tensor([r.slots + [r.slots[0]] * (width - len(r.slots)) for r, _ in cache_rows],
                             device=self.device)
        offsets = torch.arange(width, device=self.device)
        pos = torch.stack([self.next_pos[i] + (offsets * 0 if r.pooled else offsets) for r, i in cache_rows])
        mask = batchcache.round_mask(self.past, [len(r.slots) for r, _ in cache_rows],
                                     [not r.pooled for r, _ in cache_rows], width, self.model.dtype)
        adapters = [EXPERT if i == t else BASE for r, b, t in layout for i in ((b,) if t is None else (b, t))] \
            if any(r.twin for r in self.live) else None
        # score: one forward for every row
        out, hidden = self._forward(adapters, self.layer, input_ids=slots, position_ids=pos, cache=self.cache,
                                    use_cache=True, attention_mask=mask)
        bases = [b for _, b, _ in layout]
        harms = self.probe.score(hidden[bases].float()).cpu() if hidden is not None else None
        logits = out.logits
        # choose and commit: per row, which slots it keeps
        kept = torch.zeros((len(cache_rows), width), dtype=self.past.dtype, device=self.device)
        moved, chosen = [], []
        for n, (r, b, t) in enumerate(layout):
            h = None if harms is None else harms[n, :len(r.slots)]
            r.stats["forwards"] += 1
            if r.pooled:
                j = self._decide(r, logits, b, t, h)
                if j is not None:
                    for i in (b,) if t is None else (b, t):
                        kept[i, 0] = 1
                        if j:
                            moved.append(i)
                            chosen.append(j)
            else:
                k = self._verify(r, logits, b, t, h)
                kept[b, :k] = 1
                if t is not None:
                    kept[t, :k] = 1
        c = self.past.shape[1]
        batchcache.move_slots(self.cache, c, width, moved, chosen)
        self.past = batchcache.trim(self.cache, torch.cat([self.past, kept], dim=1))
        self.next_pos = self.next_pos + kept.sum(-1)
        # rows that finished leave; rows correction rewound leave and join again, steered
        finished = [r for r in self.live if r.done]
        for r in finished:
            self._conclude(r)
        rewound = [r for r in self.live if r.rewind is not None and not r.done]
        if finished or rewound:
            self._leave(finished + rewound)
        for r in rewound:
            self._rewind(r)
        for r in self.live:
            self._release(r)
        return finished

    def _propose(self, r: Row) -> None:
        if r.own is None:
            r.own = own_choice(r.lp, r.cfg, r.rng)
        if r.plan is None and (r.steering or self.every_step or (r.exact and self.rule is not None)):
            r.plan = self._steer_plan(r) if r.steering else rule_plan(
                self.rule, r.lp, r.own, r.cfg, r.rng, self.first, BATCH_STAGES if len(self.live) > 1 else ())
        if r.plan is not None:
            r.slots, r.draft_len, r.filled = r.plan.slots(), 0, False
            if r.plan.forced is None:
                r.stats["candidates_scored"] += len(r.slots)
            return
        head = r.own
        if self.mix is not None and len(r.tokens) < self.mix.m:  # SafeDecoding's mix decides the token
            head, r.mix_pool = self.mix.choose(r.lp, r.lp_e, r.cfg, r.rng)
            if len(r.tokens) + 1 >= self.mix.m:  # the mix is done after this token: the base row goes on alone
                self._drop_twin(r)
            r.slots, r.draft_len, r.filled = [head], 0, False
            return
        room = min(self.max_draft, r.cfg.max_new_tokens - len(r.tokens) - 1)
        draft = r.drafter.propose(r.context + [head], room)[:room] if r.drafter is not None and room > 0 else []
        r.slots, r.draft_len, r.filled = [head] + draft, len(draft), False

    def _steer_plan(self, r: Row) -> PoolPlan:
        """rds-expert's steered position: the expert's and the base model's top tokens."""
        s = self.correction.settings
        lp_b = r.lp
        lp_e = r.lp_e if r.twin else lp_b
        if r.twin and s.steer_alpha > 0 and len(r.tokens) - r.corr.steer_from < s.steer_alpha_tokens:
            lp_e = amplified(lp_e, lp_b, s.steer_alpha)  # the opening: the expert's shift, amplified
        pool = union_pool(lp_e, lp_b, r.own, s.expert_top, s.base_top)
        own_idx = int((pool == r.own).nonzero()[0, 0])
        floor = s.min_base_logprob if s.guard else -math.inf
        stages, plausible = steer_stages(pool, lp_b, own_idx, floor, s.steer_first, r.rng is None)
        tau = r.corr.steer_tau
        # a stop token after a complete sentence passes: stopping adds no text (steer_end)
        stops = [i for i, t in enumerate(pool.tolist()) if t in self.eos]
        if stops and not self.correction.may_end(r.corr, r):  # (decodes the steered text: only when needed)
            stops = []

        def settle(harms, last):
            if stops:
                harms = harms.clone()
                harms[stops] = 0.0
            if not last:  # the first plausible candidate that passes, else score the rest
                return next((i for i in plausible if harms[i] < tau), None)
            return steer_choice(pool, lp_e, lp_b, harms, tau, floor, r.rng)

        return PoolPlan(pool, own_idx, stages, settle, source="expert" if s.use_expert else "steered")

    def _decide(self, r: Row, logits, b: int, t: int | None, harms) -> int | None:
        """A pool's stage was scored: once the selector settles, commit the choice and return
        its slot; None while the choice is open (more candidates, or the choice forwarded
        alone, next step)."""
        plan = r.plan
        if plan.forced is not None:
            j, slot = plan.forced, 0
        else:
            idx = plan.stages[plan.stage]
            plan.harms[idx] = harms[:len(idx)]
            j = plan.settle(plan.harms, plan.stage == len(plan.stages) - 1)
            if j is None:
                plan.stage += 1
                return None
            if j not in idx:  # the choice was scored in an earlier stage: forward it alone
                plan.forced = j
                return None
            slot = idx.index(j)
        r.stats["exact_steps"] += 1
        token, own = int(plan.pool[j]), int(plan.pool[plan.own_idx])
        if r.steering and r.twin:  # how far the expert raised this token over the base model
            self.correction.steered(r.corr, float(r.lp_e[token] - r.lp[token]))
        self._commit(r, token, own, r.lp, float(plan.harms[j]), float(plan.harms[plan.own_idx]), len(plan.pool),
                     plan.source)
        r.lp = step_logprobs(logits[b, slot].float(), r.cfg)
        r.lp_e = step_logprobs(logits[t, slot].float(), r.cfg) if t is not None else None
        r.own, r.plan = None, None
        r.exact = j != plan.own_idx  # after a replacement, decide the next position exactly too
        return slot

    def _verify(self, r: Row, logits, b: int, t: int | None, harms) -> int:
        """A chain was run: keep its verified (and, under the threshold rule, harmless)
        prefix; returns how many slots the row keeps."""
        r.stats["rounds"] += 1
        r.stats["drafted"] += r.draft_len
        n_slots = len(r.slots)
        lps = step_logprobs(logits[b, :n_slots].float(), r.cfg)
        lp, own, matched, n, stopped = r.lp, r.own, 0, 0, False
        threshold = self.rule.tau if isinstance(self.rule, ThresholdRule) else None
        mixed_step = self.mix is not None and len(r.tokens) < self.mix.m
        mixed = mixed_step and r.slots[0] != r.own
        for i, token in enumerate(r.slots):
            if i > 0:
                lp = lps[i - 1]
                own = verified_choice(lp, token, r.cfg, r.rng)
                if own != token:
                    stopped = True
                    break
                matched += 1
            h = None if harms is None else float(harms[i])
            if threshold is not None and h >= threshold:
                r.exact, stopped = True, True  # decide this position from a pool next step
                break
            n += 1
            candidates = r.mix_pool if mixed_step and i == 0 else 1
            if self._commit(r, token, own, lp, h, h if not (mixed and i == 0) else None, candidates):
                break
        r.stats["accepted"] += matched
        if r.filled:
            r.stats["filled"] += r.draft_len
        elif r.drafter is not None:  # the row's own drafter learns from its own proposals only
            r.drafter.accepted(r.draft_len, matched)
        if stopped:  # the next position's distribution and own token are known already
            r.lp, r.own = lp, own
        else:
            r.lp, r.own = lps[n - 1], None
            if t is not None:
                r.lp_e = step_logprobs(logits[t, n - 1].float(), r.cfg)
        return n

    def _commit(self, r: Row, token: int, own: int, lp, harm, own_harm, candidates: int, source: str = "base") -> bool:
        """One token joins the answer; True when the row stops taking tokens this step."""
        step, _ = emit(r.detok, token, own, lp, harm, own_harm, candidates, source)
        r.trace.steps.append(step)
        r.tokens.append(token)
        if self.correction is not None:
            v = self.correction.after_token(r.corr, r, self.eos)
            if v.cut is not None:
                del r.tokens[v.cut:], r.trace.steps[v.cut:]
                r.detok = Detokenizer(self.tokenizer, r.tokens)
            if v.finish is not None:
                self._finish(r, v.finish)
            elif v.keep is not None:
                r.rewind = (v.keep, v.retract)
        else:
            reason = end_reason(token, self.eos, r.detok.text, r.cfg)
            if reason:
                self._finish(r, reason)
        if not r.done and r.rewind is None and len(r.tokens) >= r.cfg.max_new_tokens:
            self._finish(r, "length")
        return r.done or r.rewind is not None

    def _rewind(self, r: Row) -> None:
        """rds-expert rolled ``r`` back: keep its first ``keep`` tokens and join again,
        steering (with an expert row beside it when the expert steers)."""
        keep, retract = r.rewind
        r.rewind = None
        del r.tokens[keep:], r.trace.steps[keep:]
        if retract:
            r.prompt = r.prompt[:r.query_len]
        r.detok = Detokenizer(self.tokenizer, r.tokens)
        r.steering, r.twin = True, self.correction.twin
        r.plan, r.own, r.exact = None, None, False
        self.pending.append(r)

    def _finish(self, r: Row, reason: str) -> None:
        r.done = True
        r.trace.finish_reason = reason

    def _conclude(self, r: Row) -> None:
        """A finished row's result (once its step's statistics are counted), to its streamer."""
        if r.corr is not None:
            r.trace.gate = r.corr.gate
        elapsed = time.perf_counter() - r.t_join - r.t_prefill
        reason = r.trace.finish_reason
        timings = decode_timings(r.t_prefill, elapsed, len(r.tokens))
        timings.update(r.stats, mean_accepted=round(r.stats["accepted"] / max(r.stats["rounds"], 1), 3),
                       tokens_per_forward=round(len(r.tokens) / max(r.stats["forwards"], 1), 3))
        r.result = Generation(text=final_text(r.detok.text, reason, r.cfg), token_ids=list(r.tokens),
                              trace=r.trace, prompt_tokens=len(r.prompt), timings=timings)
        self._release(r)

    def _release(self, r: Row) -> None:
        """Hand the streamer the text no later step can withdraw."""
        if r.streamer is None:
            return
        if r.done and r.trace.finish_reason != "cancelled":
            text, n = r.result.text, len(r.tokens)
        else:  # a cancelled row's streamer gets only what was final when it stopped
            n = len(r.tokens) if self.correction is None or r.corr is None else self.correction.final_len(r.corr, r)
            text = r.detok.text if n == len(r.tokens) else \
                self.tokenizer.decode(r.tokens[:n], skip_special_tokens=True).rstrip("\ufffd")
            text = text[:len(text) - stop_overlap(text, r.cfg.stop)]
        if not text.startswith(r.released):
            raise RuntimeError(f"internal error: streamed text {r.released!r} is not a prefix of {text!r}")
        if len(text) > len(r.released) or n > r.released_steps:
            r.streamer.put(text[len(r.released):], r.trace.steps[r.released_steps:n])
            r.released, r.released_steps = text, max(n, r.released_steps)
        if r.done:
            r.streamer.end(r.result)
