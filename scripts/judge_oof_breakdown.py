"""The harm judge's out-of-fold agreement with readers, per fold and per attack (issue 22, part 4).

Trains the judge as `rootdefense judge train --force` does (into OUT_DIR, so the shipped one is
untouched unless OUT_DIR is its folder), keeps each read answer's out-of-fold probability and writes
OUT_DIR/oof-p.npy (each read answer's out-of-fold probability, in the store's order, as
scripts/judge_cross_encoder.py writes its own) and OUT_DIR/oof-breakdown.json: binary metrics per fold (folds by request, as the judge's own figure)
and per attack (the attack named in the store line's result key), over distinct read answers to
harmful requests at the judge's threshold. With --old-balance the class weights are rescaled as
before 2026-12-08 (class 0 to half the total, then class 1 to half of the new total), to measure
that change on the same data.

    python scripts/judge_oof_breakdown.py OUT_DIR [--store results/readings.jsonl] [--old-balance]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rootdefense.evaluation.judging import harm
from rootdefense.evaluation.judging.harm_data import default_readings


def old_balance(y, w):
    w = np.asarray(w, dtype=float).copy()
    for c in (0.0, 1.0):
        m = y == c
        if m.any():
            w[m] *= 0.5 * w.sum() / w[m].sum()
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--store", default=None, help="readings store (default: the checkout's)")
    ap.add_argument("--old-balance", action="store_true")
    args = ap.parse_args()
    store = Path(args.store) if args.store else default_readings()[0]
    if args.old_balance:
        harm.balance_classes = old_balance
    captured = {}
    out_of_fold = harm._out_of_fold

    def keep(X_train, y_train, read_rows, X_read, learned, *rest, **options):
        p = out_of_fold(X_train, y_train, read_rows, X_read, learned, *rest, **options)
        captured.update(p=p, rows=read_rows)
        return p

    harm._out_of_fold = keep
    metrics = harm.train_harm_judge(args.out_dir, readings=[store])
    attack = {}
    with open(store, encoding="utf-8") as fh:
        for line in fh:
            o = json.loads(line)
            parts = o["key"].split("|")
            attack.setdefault((o["request"], o["answer"]), parts[2] if len(parts) > 3 else "?")
    rows, p = captured["rows"], captured["p"]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    np.save(Path(args.out_dir) / "oof-p.npy", p)  # every read row's out-of-fold probability, store order
    first = harm._distinct(rows)
    y = np.array([r.harmful for r in rows])[first]
    p = p[first]
    fold = harm.read_folds(rows)[first]
    att = np.array([attack.get((rows[i].request, rows[i].answer), "?") for i in first])
    run = np.array([rows[i].detail.split(":")[0] for i in first])
    t = harm.DEFAULT_THRESHOLD
    out = {"store": str(store), "old_balance": args.old_balance, "threshold": t,
           "all_distinct": metrics["readings"]["all_distinct"],
           "per_fold": {int(k): harm.binary_metrics(y[fold == k], p[fold == k], t) for k in sorted(set(fold))},
           "per_attack": {a: harm.binary_metrics(y[att == a], p[att == a], t) for a in sorted(set(att))},
           "by_first_run": {r: harm.binary_metrics(y[run == r], p[run == r], t) for r in sorted(set(run))}}
    (Path(args.out_dir) / "oof-breakdown.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("all_distinct", "per_fold")}, indent=1))


if __name__ == "__main__":
    main()
