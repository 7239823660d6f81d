"""What ``suspect_nll`` changes: every prompt of a suspicion file (scripts/suspicion.py) at or
above the threshold, answered by the tuned rds-expert without the setting and with it at ``--threshold``.

    python scripts/suspect_compare.py SUSPICION.jsonl OUT.jsonl [--group "benign sets"]
        [--attack inthewild] [--skip 0] [--threshold 10.5 --window 8 --max-new-tokens 128]

``--group`` / ``--attack`` pick the prompts (a suspicion file's "group" and "attack" fields);
``--skip N`` leaves out each set's first N prompts (ShareGPT: those the threshold was chosen
on). One line per prompt: {"id", "set", "attack", "suspicion", "prompt" (the messages),
"answer_shipped", "answer_suspect", "identical", "trace_shipped", "trace_suspect"} (trace
summaries: flags, rollbacks, finish).
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from rootdefense.api import Defender
from rootdefense.decoding import GenerationConfig
from rootdefense.jsonl import read_objects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suspicion")
    ap.add_argument("out")
    ap.add_argument("--group", default="benign sets")
    ap.add_argument("--attack", default=None)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=10.5)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    seen: dict[str, int] = {}
    picked = []
    for r in read_objects(args.suspicion):
        if r["group"] != args.group or (args.attack and r["attack"] != args.attack):
            continue
        seen[r["set"]] = seen.get(r["set"], 0) + 1
        if seen[r["set"]] > args.skip and r["suspicion"] >= args.threshold:
            picked.append(r)
    print(f"{len(picked)} prompts at or above {args.threshold} (of {sum(seen.values()) - args.skip * len(seen)})")
    shipped = Defender.load("smollm2-135m", correction={"suspect_nll": None})
    suspect = Defender.load("smollm2-135m", lm=shipped.lm,
                            correction={"suspect_nll": args.threshold, "suspect_window": args.window})
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    with open(args.out, "w") as f:
        for r in tqdm(picked, desc="prompts at the threshold"):
            prompt = r["messages"]
            a, b = shipped.generate(messages=prompt, config=cfg), suspect.generate(messages=prompt, config=cfg)
            f.write(json.dumps({
                "id": r["id"], "set": r["set"], "attack": r["attack"], "suspicion": r["suspicion"], "prompt": prompt,
                "answer_shipped": a.text, "answer_suspect": b.text, "identical": a.token_ids == b.token_ids,
                "trace_shipped": a.trace.summary(), "trace_suspect": b.trace.summary()}) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
