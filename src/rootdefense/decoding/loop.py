"""The RDS decoding loop: propose -> score -> choose -> commit, one token per step.

With no rule the loop is plain decoding (greedy output equals ``model.generate``); with a
probe but no rule it also records the harm of each emitted token at no extra cost (the
hidden state comes out of the same forward); with a rule it scores the top-m candidates in
one forward and lets the rule choose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .candidates import forward_candidates, keep_candidate, prefill
from .config import GenerationConfig
from .kvcache import new_cache
from .rules import Candidates, Rule
from .trace import TokenStep, Trace


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    trace: Trace
    prompt_tokens: int
    timings: dict = field(default_factory=dict)

    def to_dict(self, with_trace: bool = True) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
               "finish_reason": self.trace.finish_reason, "timings": self.timings}
        out["trace"] = self.trace.to_dict() if with_trace else self.trace.summary()
        return out


class Detokenizer:
    """Incremental text of the generated ids; token pieces that split a multi-byte
    character are attributed to the token that completes it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def piece(self, token_id: int) -> str:
        text = self.tok.decode(self.ids + [token_id], skip_special_tokens=True)
        return text.removeprefix(self.text)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self.tok.decode(self.ids, skip_special_tokens=True)
        if new.endswith("\ufffd"):  # incomplete UTF-8 sequence; wait for the next token
            return ""
        piece, self.text = new[len(self.text):], new
        return piece


def emit(detok: Detokenizer, token: int, own: int, logprobs: torch.Tensor, harm: float | None,
         own_harm: float | None, candidates: int, source: str = "base") -> tuple[TokenStep, str]:
    """Commit ``token`` to the text (``own``: what the model alone would have emitted) and
    the step record every decoder keeps in its trace; returns the record and the text piece."""
    original = detok.piece(own) if token != own else None
    piece = detok.push(token)
    step = TokenStep(token_id=token, token=piece, prob=float(logprobs[token].exp()), harm=harm, original_id=own,
                     original=piece if original is None else original, original_prob=float(logprobs[own].exp()),
                     original_harm=own_harm, replaced=token != own, candidates=candidates, source=source)
    return step, piece


def end_reason(token: int, eos: set[int], text: str, cfg: GenerationConfig) -> str | None:
    """Why decoding ends after ``token``: ``"eos"``, ``"stop"`` (a stop string appeared in
    ``text``), or None to go on. Every decoder asks this after each committed token."""
    if token in eos:
        return "eos"
    if cfg.stop and any(s in text for s in cfg.stop):
        return "stop"
    return None


def final_text(text: str, trace: Trace, cfg: GenerationConfig) -> str:
    """The answer text, cut before the stop string when one ended it."""
    if trace.finish_reason == "stop":
        return text[:min(text.find(s) for s in cfg.stop if s in text)]
    return text


def decode_timings(prefill_s: float, decode_s: float, n: int) -> dict:
    """The timings every decoder reports."""
    return {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "tokens_per_s": round(n / decode_s, 2) if decode_s > 0 and n else None,
            "ms_per_token": round(1000 * decode_s / n, 2) if n else None}


def sampling_rng(cfg: GenerationConfig) -> torch.Generator | None:
    """The generator every decoder samples with (seeded by the config); None when greedy."""
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


class Decoder:
    """Decode one prompt with an optional harm probe and decision rule."""

    def __init__(self, model, tokenizer, probe=None, rule: Rule | None = None,
                 eos_token_ids: list[int] | None = None):
        if rule is not None and probe is None:
            raise ValueError("a decision rule needs a probe to score candidates")
        self.model = model
        self.tokenizer = tokenizer
        self.probe = probe
        self.rule = rule
        self.eos = set(eos_token_ids or [])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, cfg: GenerationConfig, on_token=None) -> Generation:
        """``input_ids``: (1, T) prompt. ``on_token(step, piece)`` is called per token."""
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        rng = sampling_rng(cfg)
        layer = self.probe.layer if self.probe is not None else None
        cache = new_cache(self.model)
        t0 = time.perf_counter()
        out = prefill(self.model, input_ids, cache)
        t_prefill = time.perf_counter() - t0
        logits = out.logits[0]
        prefix_len = int(input_ids.shape[1])
        detok = Detokenizer(self.tokenizer)
        trace = Trace()
        generated: list[int] = []
        t1 = time.perf_counter()
        for _ in range(cfg.max_new_tokens):
            # propose
            temp = cfg.temperature if not cfg.greedy else 1.0
            logprobs = torch.log_softmax(logits / temp, dim=-1).cpu()
            own = own_choice(logprobs, cfg, rng)
            pool = candidate_pool(logprobs, own, cfg) if self.rule is not None else torch.tensor([own])
            own_idx = int((pool == own).nonzero()[0, 0])
            # score
            step = forward_candidates(self.model, cache, pool.to(device), prefix_len, layer)
            harms = self.probe.score(step.hidden).cpu() if self.probe is not None else None
            # choose
            if self.rule is None:
                j = own_idx
            else:
                j = self.rule.choose(Candidates(pool, logprobs[pool], harms, own_idx), rng)
            # commit
            keep_candidate(cache, prefix_len, len(pool), j)
            prefix_len += 1
            logits = step.logits[j]
            token = int(pool[j])
            step_record, piece = emit(detok, token, own, logprobs, None if harms is None else float(harms[j]),
                                      None if harms is None else float(harms[own_idx]), len(pool))
            trace.steps.append(step_record)
            generated.append(token)
            if on_token is not None:
                on_token(trace.steps[-1], piece)
            reason = end_reason(token, self.eos, detok.text, cfg)
            if reason:
                trace.finish_reason = reason
                break
        elapsed = time.perf_counter() - t1
        return Generation(
            text=final_text(detok.text, trace, cfg), token_ids=generated, trace=trace,
            prompt_tokens=int(input_ids.shape[1]), timings=decode_timings(t_prefill, elapsed, len(generated)),
        )
