"""What decoding hands back: the answer, its per-token trace, and the text bookkeeping
every row of the engine shares (incremental detokenization, stop strings, timings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
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

    def __init__(self, tokenizer, tokens: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        for t in tokens or []:
            self.push(t)

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
    the step record of the trace; returns the record and the text piece."""
    original = detok.piece(own) if token != own else None
    piece = detok.push(token)
    step = TokenStep(token_id=token, token=piece, prob=float(logprobs[token].exp()), harm=harm, original_id=own,
                     original=piece if original is None else original, original_prob=float(logprobs[own].exp()),
                     original_harm=own_harm, replaced=token != own, candidates=candidates, source=source)
    return step, piece


def end_reason(token: int, eos: set[int], text: str, cfg: GenerationConfig) -> str | None:
    """Why decoding ends after ``token``: ``"eos"``, ``"stop"`` (a stop string appeared in
    ``text``), or None to go on."""
    if token in eos:
        return "eos"
    if cfg.stop and any(s in text for s in cfg.stop):
        return "stop"
    return None


def final_text(text: str, finish_reason: str, cfg: GenerationConfig) -> str:
    """The answer text, cut before the stop string when one ended it."""
    if finish_reason == "stop":
        return text[:min(text.find(s) for s in cfg.stop if s in text)]
    return text


def decode_timings(prefill_s: float, decode_s: float, n: int) -> dict:
    """The timings every answer reports."""
    return {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "tokens_per_s": round(n / decode_s, 2) if decode_s > 0 and n else None,
            "ms_per_token": round(1000 * decode_s / n, 2) if n else None}
