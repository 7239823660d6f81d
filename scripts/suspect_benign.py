"""What ``suspect_nll`` costs benign prompts: every benign prompt of a suspicion file
(scripts/suspicion.py) at or above the threshold, answered by the tuned rds-expert without
and with the setting.

    python scripts/suspect_benign.py SUSPICION.jsonl OUT.jsonl [--threshold 9.5 --window 8
        --max-new-tokens 128]

One line per prompt: {"id", "set", "suspicion", "prompt" (the messages), "answer_shipped", "answer_suspect",
"identical", "trace_shipped", "trace_suspect"} (trace summaries: flags, rollbacks, finish).
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
    ap.add_argument("--threshold", type=float, default=9.5)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    flagged = [r for r in read_objects(args.suspicion)
               if r["group"] == "benign sets" and r["suspicion"] >= args.threshold]
    shipped = Defender.load("smollm2-135m")
    suspect = Defender.load("smollm2-135m", lm=shipped.lm,
                            correction={"suspect_nll": args.threshold, "suspect_window": args.window})
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    with open(args.out, "w") as f:
        for r in tqdm(flagged, desc="benign prompts at the threshold"):
            prompt = r["messages"]
            a, b = shipped.generate(messages=prompt, config=cfg), suspect.generate(messages=prompt, config=cfg)
            f.write(json.dumps({
                "id": r["id"], "set": r["set"], "suspicion": r["suspicion"], "prompt": prompt,
                "answer_shipped": a.text, "answer_suspect": b.text, "identical": a.token_ids == b.token_ids,
                "trace_shipped": a.trace.summary(), "trace_suspect": b.trace.summary()}) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
