"""How far the expert raised the tokens of each caught answer over the base model, against
the readers' labels: the analysis behind ``end_lift`` (docs/method.md, rds-expert step 3).

    python scripts/steer_lift.py OUT.jsonl [--runs results/safety/withhold ...]
    python scripts/steer_lift.py OUT.jsonl --table     # the summary of a finished file

For every read rds-expert answer to a harmful request that was rolled back or handed to the
expert (assistant-prefill attacks left out: their forced opening is withdrawn), one forward
of the base model and one of the expert over request + answer + stop token give each answer
token's lift, log p_expert - log p_base. Writes one line per answer ({"run", "attack",
"label", "lift_sum", "lift_mean", "lift_max", "eos_lift", "n", "answer"}) and prints, per
reader label, how many answers have some token lifted by at least each threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_RUNS = ("results/safety/withhold", "results/safety/adaptive-withhold", "results/safety/families-withhold")


def measure(runs: list[str], out: str, lm, expert) -> list[dict]:
    """Write and return the lift rows of ``runs`` for the loaded model ``lm`` and its attached
    ``expert`` (:class:`rootdefense.expert.adapter` handle)."""
    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).parent))
    from suspicion import _rebuilt

    from rootdefense.jsonl import read_objects
    from rootdefense.models import encode_chat

    tok, stop = lm.tokenizer, lm.eos_token_ids[0]
    jobs = []
    for run in runs:
        folder = Path(run)
        res = {r["key"]: r for r in read_objects(folder / "results.jsonl") if r.get("kind") == "result"}
        attacks = {o["key"]: o["attacked"] for o in read_objects(folder / "attacks.jsonl")
                   if o.get("kind") == "attack"} if (folder / "attacks.jsonl").exists() else {}
        labels = {o["id"]: o["label"] for o in read_objects(folder / "reading" / "labels.jsonl")}
        for o in read_objects(folder / "reading" / "key.jsonl"):
            r = res[o["key"]]
            t = r.get("trace") or {}
            if r["defense"] == "rds-expert" and r["harmful"] and r["attack"] != "prefill" and o["id"] in labels \
                    and (t.get("rollbacks") or t.get("loop_restarts")):
                jobs.append((folder.name, r, labels[o["id"]], attacks))
    rows = []
    with open(out, "w") as fh:
        for run, r, label, attacks in tqdm(jobs, desc="lift"):
            ids = encode_chat(tok, _rebuilt(r, attacks))[0].tolist()
            x = torch.tensor([ids + tok.encode(r["answer"], add_special_tokens=False) + [stop]])
            with torch.no_grad():
                lb = torch.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
                with expert.active() as peft_model:
                    le = torch.log_softmax(peft_model(input_ids=x).logits[0].float(), -1)
            pos = torch.arange(len(ids) - 1, x.shape[1] - 1)
            target = x[0, len(ids):]
            lift = le[pos, target] - lb[pos, target]
            row = {"run": run, "attack": r["attack"], "label": label, "lift_sum": round(float(lift[:-1].sum()), 2),
                   "lift_mean": round(float(lift[:-1].mean()), 3), "lift_max": round(float(lift[:-1].max()), 2),
                   "eos_lift": round(float(lift[-1]), 2), "n": int(x.shape[1] - len(ids) - 1), "answer": r["answer"]}
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
    return rows


def table(rows: list[dict], thresholds=(2.0, 3.0, 4.0)) -> None:
    print("| reader label | answers | " + " | ".join(f"highest lift < {t:g}" for t in thresholds) + " |")
    print("|---|---|" + "---|" * len(thresholds))
    for label in ("help", "refusal", "redirect", "degenerate"):
        v = [r["lift_max"] for r in rows if r["label"] == label]
        if v:
            print(f"| {label} | {len(v)} | " + " | ".join(str(sum(x < t for x in v)) for t in thresholds) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS))
    ap.add_argument("--table", action="store_true", help="only print the summary of an existing OUT file")
    args = ap.parse_args()
    if args.table:
        from rootdefense.jsonl import read_objects

        table(read_objects(args.out))
        return
    from rootdefense import api

    d = api.Defender.load("smollm2-135m", defense="rds-expert")
    table(measure(args.runs, args.out, d.lm, d.decoder.correction.expert))


if __name__ == "__main__":
    main()
