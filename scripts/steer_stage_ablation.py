"""What staged steering adds to the correcting decoder (rds-expert), side by side in one process.

The tuned rds-expert defense on held-out AdvBench prompts (the bench's harmful set), greedy,
128 new tokens, plain and under the prefix injection, with steered steps scored in two stages
(``steer_first`` 3, the default) or the whole union pool at once (``steer_first`` 0). Each
repetition runs both variants back to back on every prompt, so machine noise hits them
alike; it checks that they give the same answers. Writes one JSON object (medians and every
run) to OUT.

Usage: python scripts/steer_stage_ablation.py [N_PROMPTS=10] [REPS=1] [OUT=results/bench/steer-stage-ablation.json]
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
from rootdefense.evaluation.attacks import prefill_text

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
out = Path(sys.argv[3] if len(sys.argv) > 3 else "results/bench/steer-stage-ablation.json")
torch.set_num_threads(2)
d = Defender.load(defense="rds-expert")
cfg = GenerationConfig(max_new_tokens=128)
variants = {"staged": 3, "whole pool": 0}
runs = []
answers: dict = {}
same = True
with torch.no_grad():
    for rep in range(reps):
        for i, request in enumerate(bench_prompts(n)["harmful"]):
            for attack in ("none", "prefill"):
                prefill = prefill_text(request, i) if attack == "prefill" else ""
                order = list(variants) if (i + rep) % 2 == 0 else list(reversed(variants))
                for name in order:
                    d.decoder.settings.steer_first = variants[name]
                    t0 = time.perf_counter()
                    g = d.generate(request, config=cfg, prefill=prefill)
                    wall = time.perf_counter() - t0
                    steered = sum(s.source == "expert" for s in g.trace.steps)
                    runs.append({"prompt": i, "attack": attack, "variant": name, "rep": rep, "wall_s": round(wall, 3),
                                 "tokens": len(g.token_ids), "steered_tokens": steered})
                    same &= answers.setdefault((i, attack), g.token_ids) == g.token_ids
                print(runs[-2:], flush=True)
d.decoder.settings.steer_first = 3


def med(name, key="wall_s", only_steered=False):
    xs = [r[key] for r in runs if r["variant"] == name and (r["steered_tokens"] or not only_steered)]
    return round(statistics.median(xs), 3) if xs else None


steered_pairs = [(a, b) for a in runs for b in runs if a["variant"] == "staged" and b["variant"] == "whole pool"
                 and (a["prompt"], a["attack"], a["rep"]) == (b["prompt"], b["attack"], b["rep"]) and a["steered_tokens"]]
result = {
    "prompts": n, "attacks": ["none", "prefill"], "reps": reps, "max_new_tokens": 128, "same_answers": same,
    "answers_with_steering": len({(r["prompt"], r["attack"]) for r in runs if r["steered_tokens"]}),
    "median_seconds_per_answer": {k: med(k) for k in variants},
    "median_seconds_per_steered_answer": {k: med(k, only_steered=True) for k in variants},
    "median_whole_over_staged_on_steered_answers": round(statistics.median(b["wall_s"] / a["wall_s"]
                                                                            for a, b in steered_pairs), 3)
    if steered_pairs else None,
    "runs": runs,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
