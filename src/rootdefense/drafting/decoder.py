"""Speculative RDS: draft a chain, verify it in one forward, and let the probe judge every
verified token from that same forward.

Each round the model's own next token heads the chain and the drafter's guess follows. One
forward over the chain gives, at every position, the hidden state of the token there (its
harm) and the logits for the next one (whether the next drafted token is the model's own
choice). Tokens are committed while they are the model's own choice and harmless. At the
first harmful own token the round stops and that one position is decided exactly as the
plain :class:`~rootdefense.decoding.loop.Decoder` decides it: the rule chooses among the
top-m candidates (greedy, scored in two stages, the own token and the next two first; the
rest only if those are all harmful, which settles the same choice). After a replacement the next positions are decided that way too,
without drafting, until the model's own token is harmless again (harm comes in stretches,
and a chain that starts with a harmful token is a wasted forward). So greedy output,
defended or not, is the plain decoder's, and sampled output has the plain decoder's
distribution.

Only rules that keep the model's own token whenever it is harmless qualify (the threshold
rule); the paper and weighted rules may replace a harmless token, so they need candidate
scoring at every step and gain nothing from drafts.
"""

from __future__ import annotations

import itertools
import time

import torch

from ..decoding.candidates import forward_candidates, keep_candidate, prefill
from ..decoding.config import GenerationConfig
from ..decoding.kvcache import new_cache
from ..decoding.loop import (
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
from ..decoding.rules import Candidates, Rule, ThresholdRule
from ..decoding.trace import Trace
from ..decoding.verify import crop_to, forward_chain, step_logprobs, verified_choice
from ..errors import InputError
from .base import Drafter

# Greedy exact steps score the own token and the next most probable candidates first: on a
# CPU a forward over 3 candidates costs about 1.1x one token, over 20 about 2.5x (bench
# profile), and the own token or one of the next two is usually harmless.
FIRST_CANDIDATES = 3


def pool_stages(m: int, own_idx: int, first: int, greedy: bool, more: tuple[int, ...] = ()) -> list[int]:
    """Bounds of the stages in which a pool of ``m`` candidates is scored: ``[0, first, m]``
    when greedy with the own token first (:meth:`ThresholdRule.settled` can then stop early),
    with the bounds in ``more`` between, else ``[0, m]`` (the whole pool at once)."""
    if not (greedy and own_idx == 0 and 0 < first < m):
        return [0, m]
    return [0, first, *sorted(b for b in set(more) if first < b < m), m]


def check_draft_settings(max_draft: int, first: int) -> None:
    """Clear errors for the speculative decoders' numeric settings (single-stream and batched)."""
    if max_draft < 0:
        raise InputError(f"max_draft must be >= 0, got {max_draft}")
    if not isinstance(first, int) or first < 0:
        raise InputError(f"first_candidates must be an integer >= 0 (0: score the whole pool at once), got {first!r}")


class SpeculativeDecoder:
    """Decode one prompt with a drafter, an optional harm probe and an optional threshold
    rule; ``max_draft`` caps the drafted tokens verified per forward."""

    def __init__(self, model, tokenizer, drafter: Drafter, probe=None, rule: Rule | None = None,
                 eos_token_ids: list[int] | None = None, max_draft: int = 8,
                 first_candidates: int = FIRST_CANDIDATES):
        if rule is not None and probe is None:
            raise ValueError("a decision rule needs a probe to score candidates")
        if rule is not None and not isinstance(rule, ThresholdRule):
            raise InputError(
                f"speculative decoding supports the threshold rule only (got '{rule.name}'): it keeps "
                "every harmless token the model chooses, so verified drafts can be committed; other "
                "rules may replace harmless tokens and need the plain decoder"
            )
        check_draft_settings(max_draft, first_candidates)
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.probe = probe
        self.rule = rule
        self.eos = set(eos_token_ids or [])
        self.max_draft = max_draft
        self.first_candidates = first_candidates  # 0: score the whole pool at once

    def _harmful(self, harm: float | None) -> bool:
        return self.rule is not None and harm >= self.rule.tau

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cfg: GenerationConfig, on_token=None) -> Generation:
        """``input_ids``: (1, T) prompt. ``on_token(step, piece)`` is called per token."""
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        rng = sampling_rng(cfg)
        layer = self.probe.layer if self.probe is not None else None
        cache = new_cache(self.model)
        self.drafter.reset()
        t0 = time.perf_counter()
        logits = prefill(self.model, input_ids, cache).logits[0]
        t_prefill = time.perf_counter() - t0
        prefix_len = int(input_ids.shape[1])
        context = input_ids[0].tolist()
        detok = Detokenizer(self.tokenizer)
        trace = Trace()
        generated: list[int] = []
        stats = {"forwards": 0, "rounds": 0, "drafted": 0, "accepted": 0, "exact_steps": 0, "candidates_scored": 0}

        def commit(token, own, logprobs, harm, own_harm, candidates) -> bool:
            """Record one emitted token; True when decoding ends after it."""
            step, piece = emit(detok, token, own, logprobs, harm, own_harm, candidates)
            trace.steps.append(step)
            generated.append(token)
            context.append(token)
            if on_token is not None:
                on_token(trace.steps[-1], piece)
            reason = end_reason(token, self.eos, detok.text, cfg)
            if reason:
                trace.finish_reason = reason
            return reason is not None or len(generated) >= cfg.max_new_tokens

        def exact_step(logprobs, own):
            """Decide one position as the plain decoder does: the rule chooses among the top-m
            candidates. Greedy, they are scored in probability order, a first few, then the
            rest only if those leave the choice open (:meth:`ThresholdRule.settled`); else
            all in one forward. Returns the next logits, whether the own token was replaced,
            and whether decoding ends."""
            nonlocal prefix_len
            pool = candidate_pool(logprobs, own, cfg)
            own_idx = int((pool == own).nonzero()[0, 0])
            m = len(pool)
            bounds = pool_stages(m, own_idx, self.first_candidates, rng is None)
            harms: list[float] = []
            for a, b in itertools.pairwise(bounds):
                step = forward_candidates(self.model, cache, pool[a:b].to(device), prefix_len, layer)
                harms += self.probe.score(step.hidden).cpu().tolist()
                stats["forwards"] += 1
                stats["candidates_scored"] += b - a
                if len(bounds) > 2:
                    j = self.rule.settled(harms, m)
                else:
                    j = self.rule.choose(Candidates(pool, logprobs[pool], torch.tensor(harms), own_idx), rng)
                if j is None:  # every scored candidate is harmful: score the rest
                    crop_to(cache, prefix_len)
                    continue
                if a <= j < b:
                    keep_candidate(cache, prefix_len, b - a, j - a)
                    logits = step.logits[j - a]
                else:  # none is harmless and the least harmful was scored earlier: forward it alone
                    crop_to(cache, prefix_len)
                    logits = forward_chain(self.model, cache, pool[j:j + 1].to(device), prefix_len, None).logits[0]
                    stats["forwards"] += 1
                break
            prefix_len += 1
            stats["exact_steps"] += 1
            done = commit(int(pool[j]), own, logprobs, harms[j], harms[own_idx], m)
            return logits, j != own_idx, done

        own = None  # the model's own next token, when a rejected draft already drew it
        correcting = False  # the last token was a correction: harm tends to persist, so do not draft
        done = False
        t1 = time.perf_counter()
        while not done:
            logprobs = step_logprobs(logits, cfg)
            if own is None:
                own = own_choice(logprobs, cfg, rng)
            if correcting:
                logits, correcting, done = exact_step(logprobs, own)
                own = None
                continue
            # draft: the model's own token heads the chain, the drafter's guess follows
            room = min(self.max_draft, cfg.max_new_tokens - len(generated) - 1)
            draft = self.drafter.propose(context + [own], room)[:room] if room > 0 else []
            chain = [own] + draft
            # verify: one forward gives every chain token's harm and the logits after it
            out = forward_chain(self.model, cache, torch.tensor(chain, device=device), prefix_len, layer)
            harms = self.probe.score(out.hidden).cpu().tolist() if self.probe is not None else [None] * len(chain)
            chain_logprobs = step_logprobs(out.logits, cfg)  # row i: the next token after chain[i]
            stats["forwards"] += 1
            stats["rounds"] += 1
            stats["drafted"] += len(draft)
            matched = 0
            harmful = False
            for i, token in enumerate(chain):
                if i > 0:
                    logprobs = chain_logprobs[i - 1]
                    own = verified_choice(logprobs, token, cfg, rng)
                    if own != token:
                        break
                    matched += 1
                if self._harmful(harms[i]):
                    harmful = True
                    break
                prefix_len += 1
                done = commit(token, token, logprobs, harms[i], harms[i], 1)
                own = None
                if done:
                    break
            stats["accepted"] += matched
            self.drafter.accepted(len(draft), matched)
            if done:
                break
            crop_to(cache, prefix_len)  # keep the committed prefix only
            if harmful:  # correct: decide this position as the plain decoder does
                logits, correcting, done = exact_step(logprobs, own)
                own = None
            else:  # the whole chain was kept, or the draft at i was rejected and ``own`` drawn
                logits = out.logits[-1] if own is None else out.logits[i - 1]
        elapsed = time.perf_counter() - t1
        timings = decode_timings(t_prefill, elapsed, len(generated))
        timings.update(stats, mean_accepted=round(stats["accepted"] / max(stats["rounds"], 1), 3),
                       tokens_per_forward=round(len(generated) / stats["forwards"], 3))
        return Generation(
            text=final_text(detok.text, trace, cfg), token_ids=generated, trace=trace,
            prompt_tokens=int(input_ids.shape[1]), timings=timings,
        )
