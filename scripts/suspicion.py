"""The suspicion of requests (rds-expert's ``suspect_nll``): benign prompt sets against the
prompts of finished evaluation runs, to choose and check the threshold.

    python scripts/suspicion.py OUT.jsonl [--model smollm2-135m] [--window 8] [--runs results/safety/withhold ...]
        [--benign alarming,edgy,mtbench,gsm8k,sharegpt] [--sharegpt 400] [--thresholds 9.5,10,10.5]
    python scripts/suspicion.py OUT.jsonl --table [--thresholds ...]    # the table of a finished file

Writes one line per prompt ({"group", "set", "attack", "id", "suspicion", "messages"}) and prints, per
group, the quantiles and how many prompts reach each threshold. An evaluation run's prompts
are rebuilt from its results (one row per ask, whichever defense answered it): template attacks by re-applying the
attack until its recorded metadata matches, optimised suffixes from its attacks.jsonl. The
surprisal is the model's own (one full forward per prompt); the suspicion is the
same function the decoder uses (:mod:`rootdefense.correction.suspicion`); prompts longer
than 2,048 tokens are read up to there.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rootdefense.correction.suspicion import prompt_surprisal, suspicion, template_span
from rootdefense.data.loaders import load_dataset
from rootdefense.data.records import Example
from rootdefense.evaluation.attacks import make_attack
from rootdefense.jsonl import read_objects
from rootdefense.models import encode_chat
from rootdefense.models.loading import load_model

DEFAULT_RUNS = ("results/safety/withhold", "results/safety/families-withhold", "results/safety/adaptive-withhold")


def _dict(value) -> dict:
    return value if isinstance(value, dict) else ast.literal_eval(value)


def _rebuilt(row: dict, attacks: dict, tries: int = 500) -> list[dict]:
    """The messages the model was given for this result row (the same for every defense)."""
    meta = _dict(row.get("attack_meta") or {})
    if row["key"].rsplit("|", 2)[0] in attacks:  # an optimised suffix: stored
        return _dict(attacks[row["key"].rsplit("|", 2)[0]])["messages"]
    attack = make_attack(row["attack"])
    example = Example(id=row["prompt_id"], prompt=row["prompt"], harmful=row["harmful"], source=row["dataset"])
    for index in range(tries):
        attacked = attack.apply(example, None, index)
        if attacked.meta == meta:
            return attacked.messages
    raise SystemExit(f"cannot rebuild the prompt of {row['key']} (attack metadata {meta})")


def run_prompts(folder: Path) -> list[tuple[str, str, str, list[dict]]]:
    attacks = {o["key"]: o["attacked"] for o in read_objects(folder / "attacks.jsonl") if o.get("kind") == "attack"} \
        if (folder / "attacks.jsonl").exists() else {}
    out, seen = [], set()
    for row in read_objects(folder / "results.jsonl"):
        ask = row.get("key", "").rsplit("|", 2)[0] + "|" + str(row.get("sample"))  # the prompt, whatever the defense
        if row.get("kind") == "result" and "error" not in row and ask not in seen:
            seen.add(ask)
            kind = "harmful" if row["harmful"] else "benign"
            out.append((f"{folder.name}:{kind}", row["attack"], row["key"], _rebuilt(row, attacks)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or folder")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS))
    ap.add_argument("--benign", default="alarming,edgy,mtbench,gsm8k,sharegpt")
    ap.add_argument("--sharegpt", type=int, default=400, help="ShareGPT prompts to read")
    ap.add_argument("--thresholds", default="9.5,10,10.5")
    ap.add_argument("--table", action="store_true", help="only print the table of an existing OUT file")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.table:
        print_table(list(read_objects(args.out)), args.window, thresholds)
        return

    items = []
    for name in [n for n in args.benign.split(",") if n]:
        limit = args.sharegpt if name == "sharegpt" else None
        items += [("benign sets", name, "none", ex.id, [{"role": "user", "content": ex.prompt}])
                  for ex in load_dataset(name, limit=limit)]
    for folder in args.runs:
        items += [(group, Path(folder).name, attack, key, messages)
                  for group, attack, key, messages in run_prompts(Path(folder))]

    lm = load_model(args.model)
    span = template_span(lm.tokenizer)
    rows = []
    with open(args.out, "w") as f:
        for group, name, attack, key, messages in tqdm(items, desc="suspicion"):
            ids = encode_chat(lm.tokenizer, messages)[0].tolist()[:2048]
            s = suspicion(prompt_surprisal(lm.model, ids), span, args.window)
            row = {"group": group, "set": name, "attack": attack, "id": key, "suspicion": round(s, 4),
                   "messages": messages}
            rows.append(row)
            f.write(json.dumps(row) + "\n")

    print_table(rows, args.window, thresholds)


def print_table(rows: list[dict], window: int, thresholds: list[float]) -> None:
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cells.setdefault((r["group"] if r["group"] != "benign sets" else f"benign set {r['set']}", r["attack"]),
                         []).append(r["suspicion"])
    print(f"window {window}; thresholds {thresholds}")
    print("| prompts | attack | n | median | p99 | max | " + " | ".join(f">= {t}" for t in thresholds) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(thresholds))
    for (group, attack), v in sorted(cells.items()):
        x = np.array(v)
        counts = " | ".join(str(int((x >= t).sum())) for t in thresholds)
        print(f"| {group} | {attack} | {len(x)} | {np.median(x):.2f} | {np.percentile(x, 99):.2f} | {x.max():.2f} | "
              f"{counts} |")


if __name__ == "__main__":
    main()
