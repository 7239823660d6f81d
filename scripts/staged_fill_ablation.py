"""What staged candidate scoring and fill drafts add to lazy RDS, side by side in one process.

Lazy exact RDS (threshold rule, no drafts) on held-out AdvBench prompts (the bench's harmful
set), greedy, single-stream with the candidate pool staged or whole, and in a batch of all
the prompts with each of the four combinations of staging and filling. Each repetition runs
every variant back to back, so machine noise hits them alike. It also checks that all
variants give the same answers. Writes one JSON object (medians and every run) to OUT.

Usage: python scripts/staged_fill_ablation.py [N_PROMPTS=8] [REPS=2] [OUT=results/bench/ablation-staged-fill.json]
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rootdefense.api import Defender
from rootdefense.bench import bench_prompts
from rootdefense.decoding import GenerationConfig
from rootdefense.drafting import NoDrafter, SpeculativeDecoder
from rootdefense.drafting.batched import BatchSpeculativeDecoder
from rootdefense.drafting.decoder import FIRST_CANDIDATES
from rootdefense.models import encode_chat

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 2
out = Path(sys.argv[3] if len(sys.argv) > 3 else "results/bench/ablation-staged-fill.json")
torch.set_num_threads(2)
d = Defender.load(defense="rds", rule="threshold", drafter="lazy")
lm = d.lm
kw = {"probe": d.probe, "rule": d.rule, "eos_token_ids": lm.eos_token_ids}
prompts = bench_prompts(n)["harmful"]
ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
cfg = GenerationConfig(max_new_tokens=128)
single = {"staged": SpeculativeDecoder(lm.model, lm.tokenizer, NoDrafter(), first_candidates=FIRST_CANDIDATES, **kw),
          "whole pool": SpeculativeDecoder(lm.model, lm.tokenizer, NoDrafter(), first_candidates=0, **kw)}
batch = {f"{stage}{' + fill' if fill else ''}": BatchSpeculativeDecoder(
    lm.model, lm.tokenizer, NoDrafter(), first_candidates=FIRST_CANDIDATES if stage == "staged" else 0, fill=fill, **kw)
    for stage in ("staged", "whole pool") for fill in (True, False)}
single_tps = {k: [] for k in single}
batch_tps = {k: [] for k in batch}
answers, same = {}, True
with torch.no_grad():
    for _ in range(reps):
        for i, x in enumerate(ids):
            for name, dec in single.items():
                g = dec.generate(x, cfg)
                single_tps[name].append(g.timings["tokens_per_s"])
                same &= answers.setdefault(i, g.token_ids) == g.token_ids
        for name, dec in batch.items():
            t0 = time.perf_counter()
            gens = dec.generate(ids, cfg)
            batch_tps[name].append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0))
            same &= all(answers[i] == g.token_ids for i, g in enumerate(gens))
result = {
    "prompts": n, "reps": reps, "set": "harmful (held-out AdvBench)", "max_new_tokens": 128, "same_answers": same,
    "single_tokens_per_s_median": {k: round(statistics.median(v), 2) for k, v in single_tps.items()},
    "batch_tokens_per_s_median": {k: round(statistics.median(v), 2) for k, v in batch_tps.items()},
    "batch_vs_single_staged": {k: round(statistics.median(v) / statistics.median(single_tps["staged"]), 2)
                               for k, v in batch_tps.items()},
    "runs": {"single": single_tps, "batch": batch_tps},
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
