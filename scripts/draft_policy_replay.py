"""Runs against the code before the generation engine (git checkout 05c4a94): it replays
the single-stream speculative decoder's forwards, which the engine no longer makes one by one.

Compare drafting policies without timing noise: decode held-out MT-bench prompts with
speculative RDS (threshold rule) under each policy, record the width of every target forward,
and price the forwards with a cost-by-width curve from a bench profile. The figure per prompt
is tokens per unit of cost (1.0 = one token per one-token forward, what undefended decoding
gets); medians over prompts. Needs a trained draft head (`rootdefense draft train`).

Usage: python scripts/draft_policy_replay.py FIRST LAST [BENCH_JSON] [OUT]
  prompts FIRST..LAST-1 of the held-out MT-bench list (the bench uses the first 5 or 10);
  BENCH_JSON supplies profile.chain_cost_vs_one_token and candidate_forward_ms.vs_one_token
  (default results/bench/bench-embedded-v5-10prompts.json).
"""

import json
import statistics
import sys
from pathlib import Path

import torch

import rootdefense.drafting.decoder as spec
from rootdefense.api import Defender
from rootdefense.bench import bench_prompts
from rootdefense.decoding import GenerationConfig
from rootdefense.drafting import PromptLookupDrafter, SpeculativeDecoder
from rootdefense.drafting.base import FirstOfDrafter
from rootdefense.drafting.head import HeadDrafter, load_head
from rootdefense.models import encode_chat
from rootdefense.paths import head_dir

first, last = int(sys.argv[1]), int(sys.argv[2])
profile = json.loads(Path(sys.argv[3] if len(sys.argv) > 3 else
                          "results/bench/bench-embedded-v5-10prompts.json").read_text())["profile"]
out = Path(sys.argv[4]) if len(sys.argv) > 4 else None
chain_cost = {int(k): v for k, v in profile["chain_cost_vs_one_token"].items()}
pool_cost = profile["candidate_forward_ms"]["vs_one_token"]


def cost(width: int) -> float:
    """Linear interpolation between the profiled widths (beyond the last: its cost)."""
    known = sorted(chain_cost)
    if width >= known[-1]:
        return chain_cost[known[-1]]
    lo = max(k for k in known if k <= width)
    hi = min(k for k in known if k >= width)
    return chain_cost[lo] if lo == hi else chain_cost[lo] + (chain_cost[hi] - chain_cost[lo]) * (width - lo) / (hi - lo)


torch.set_num_threads(2)
base = Defender.load(defense="rds", rule="threshold", drafter="lazy")
lm = base.lm
head = load_head(head_dir(lm.model_id), lm)[0]
widths: list = []
chain, candidates = spec.forward_chain, spec.forward_candidates


def record_chain(model, cache, ids, prefix_len, layer):
    widths.append(int(ids.shape[0]))
    return chain(model, cache, ids, prefix_len, layer)


def record_candidates(model, cache, ids, prefix_len, layer):
    widths.append(("pool", int(ids.shape[0])))
    return candidates(model, cache, ids, prefix_len, layer)


spec.forward_chain, spec.forward_candidates = record_chain, record_candidates
policies = {
    "lookup": lambda: PromptLookupDrafter(),
    "head": lambda: HeadDrafter(lm.model, head),
    "lookup(1-gram+)+head": lambda: FirstOfDrafter([PromptLookupDrafter(), HeadDrafter(lm.model, head)]),
    "lookup(2-gram+)+head": lambda: FirstOfDrafter([PromptLookupDrafter(min_ngram=2), HeadDrafter(lm.model, head)]),
}
rows = []
for prompt in bench_prompts(last)["benign"][first:last]:
    ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}])
    answers = set()
    for name, make in policies.items():
        drafter = make()
        widths.clear()
        gen = SpeculativeDecoder(lm.model, lm.tokenizer, drafter, probe=base.probe, rule=base.rule,
                                 eos_token_ids=lm.eos_token_ids).generate(ids, GenerationConfig(max_new_tokens=128))
        for d in getattr(drafter, "drafters", [drafter]):
            if hasattr(d, "close"):
                d.close()
        priced = sum(cost(w) if isinstance(w, int) else pool_cost for w in widths)
        answers.add(tuple(gen.token_ids))
        rows.append({"prompt": prompt[:60], "policy": name, "tokens": len(gen.token_ids), "forwards": len(widths),
                     "tokens_per_cost": round(len(gen.token_ids) / priced, 3)})
        print(rows[-1], flush=True)
    assert len(answers) == 1, "drafting changed an answer"
summary = {name: round(statistics.median(r["tokens_per_cost"] for r in rows if r["policy"] == name), 3)
           for name in policies}
print("median tokens per unit of cost:", summary)
if out:
    out.write_text(json.dumps({"prompts": [first, last], "profile_cost": chain_cost, "pool_cost": pool_cost,
                               "median": summary, "rows": rows}, indent=2))
