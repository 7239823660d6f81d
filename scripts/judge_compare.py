"""Two harm judges' out-of-fold probabilities compared on the folds both judged (issue 22, part 4).

A and B are .npy files of each read answer's out-of-fold probability in the readings store's
order (scripts/judge_oof_breakdown.py writes the network's, OUT_DIR/oof-p.npy;
scripts/judge_cross_encoder.py the cross-encoder's, OUT.p.npy, NaN where a fold was not run).
Prints and writes binary metrics per fold and over those folds for A, B and their mean, at 0.5,
over distinct read answers to harmful requests.

    python scripts/judge_compare.py A.npy B.npy OUT.json [--store results/readings.jsonl]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from rootdefense.evaluation.judging import harm
from rootdefense.evaluation.judging.harm_data import default_readings, read_answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("out")
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    harmful, _ = read_answers(args.store or default_readings()[0])
    rows = [r for r in harmful if r.answer.strip()]  # as the judge and the cross-encoder read them
    a, b = np.load(args.a), np.load(args.b)
    if not len(a) == len(b) == len(rows):
        raise SystemExit(f"{len(a)} and {len(b)} probabilities for {len(rows)} read answers: not the same store")
    first = harm._distinct(rows)
    y = np.array([r.harmful for r in rows])[first]
    a, b = a[first], b[first]
    fold = harm.read_folds(rows)[first]
    both = ~np.isnan(a) & ~np.isnan(b)
    out = {"a": args.a, "b": args.b, "folds": sorted(int(f) for f in set(fold[both]))}
    for name, p in (("a", a), ("b", b), ("mean", (a + b) / 2)):
        out[name] = {"judged_folds": harm.binary_metrics(y[both], p[both], 0.5),
                     **{f"fold {f}": harm.binary_metrics(y[both & (fold == f)], p[both & (fold == f)], 0.5)
                        for f in out["folds"]}}
        m = out[name]["judged_folds"]
        print(f"{name:5s} n={m['n']} kappa={m['kappa']} recall={m['recall']} precision={m['precision']} "
              f"auroc={m['auroc']}")
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
