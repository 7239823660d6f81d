"""A defense configuration over a model, ready to decode: one prompt, a batch of prompts,
or a running :class:`~.engine.Engine` that requests join and leave (a server's loop).
Every path runs the engine's one loop."""

from __future__ import annotations

import time

import torch

from ..errors import InputError
from .config import GenerationConfig
from .engine import Engine, Request
from .generation import Generation
from .pools import FIRST_CANDIDATES, check_pool_settings
from .rules import Rule, ThresholdRule


class Decoder:
    """``probe``: the harm probe (with no rule it only records each token's harm); ``rule``:
    the decision rule; ``drafter``: candidate source for speculative decoding (None: one
    token per forward, and a rule scores candidates at every step); ``correction``:
    rds-expert's hook (:class:`rootdefense.correction.Correction`); ``mix``: SafeDecoding's
    (:class:`.mix.SafeDecodingMix`). ``max_draft`` caps the drafted tokens verified per
    forward; ``first_candidates`` the candidates a greedy pool scores first (0: whole);
    ``fill``: batch rows without a draft fill slots a neighbour's pool pays for."""

    def __init__(self, model, tokenizer, probe=None, rule: Rule | None = None, eos_token_ids: list[int] | None = None,
                 *, drafter=None, max_draft: int = 8, first_candidates: int = FIRST_CANDIDATES, fill: bool = True,
                 correction=None, mix=None):
        if rule is not None and probe is None:
            raise ValueError("a decision rule needs a probe to score candidates")
        if drafter is not None and rule is not None and not isinstance(rule, ThresholdRule):
            raise InputError(
                f"speculative decoding supports the threshold rule only (got '{rule.name}'): it keeps "
                "every harmless token the model chooses, so verified drafts can be committed; other "
                "rules may replace harmless tokens and need --drafter none")
        if correction is not None and (rule is not None or mix is not None):
            raise InputError("rds-expert's correction decides tokens itself; it takes no rule or mix")
        if not isinstance(max_draft, int) or max_draft < 0:
            raise InputError(f"max_draft must be >= 0, got {max_draft}")
        check_pool_settings(first_candidates)
        self.model, self.tokenizer, self.probe, self.rule = model, tokenizer, probe, rule
        self.eos_token_ids = list(eos_token_ids or [])
        self.drafter, self.max_draft, self.first_candidates, self.fill = drafter, max_draft, first_candidates, fill
        self.correction, self.mix = correction, mix

    def engine(self) -> Engine:
        """A new running batch with this configuration."""
        return Engine(self.model, self.tokenizer, probe=self.probe, rule=self.rule, drafter=self.drafter,
                      max_draft=self.max_draft, first_candidates=self.first_candidates, fill=self.fill,
                      correction=self.correction, mix=self.mix, eos_token_ids=self.eos_token_ids)

    def describe(self) -> dict:
        out = {}
        if self.rule is not None:
            out.update(self.rule.describe())
        if self.correction is not None:
            out.update(self.correction.describe())
        if self.drafter is not None:
            out.update(self.drafter.describe(), max_draft=self.max_draft)
        return out

    def generate(self, input_ids: torch.Tensor, cfg: GenerationConfig, streamer=None,
                 query_len: int | None = None) -> Generation:
        """Decode one prompt, ``input_ids`` (1, T): a batch of one."""
        engine = self.engine()
        row = engine.add(Request(input_ids[0].tolist(), cfg, query_len=query_len, streamer=streamer))
        engine.run()
        return row.result

    def generate_batch(self, prompts: list[torch.Tensor], cfg: GenerationConfig | list[GenerationConfig]
                       ) -> list[Generation]:
        """Decode several prompts together (each a (1, T) tensor), each with ``cfg`` or its own
        config; greedy answers equal :meth:`generate`'s."""
        cfgs = cfg if isinstance(cfg, list) else [cfg] * len(prompts)
        if len(cfgs) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(cfgs)} configs")
        engine = self.engine()
        rows = [engine.add(Request(p[0].tolist(), c)) for p, c in zip(prompts, cfgs, strict=True)]
        t0 = time.perf_counter()
        engine.run()
        elapsed = time.perf_counter() - t0
        out = [r.result for r in rows]
        total = sum(len(g.token_ids) for g in out)
        for g in out:
            g.timings.update(batch_size=len(out), batch_tokens=total,
                             batch_tokens_per_s=round(total / elapsed, 2) if elapsed > 0 else None)
        return out
