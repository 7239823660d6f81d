"""Measure the refusal judge on labelled answers from installed packages, and on the safety
expert's own refusal openings.

    python scripts/refusal_judge_check.py [--sharegpt 1000] [--extra none] [--out F]

- UncensorBench reference answers: each prompt's censored answer is a refusal, its
  uncensored answer is not (accuracy and Cohen's kappa);
- benign answers (ShareGPT first turns and MT-bench reference answers): the share the judge
  calls refusals (false refusals, what an undefended over-refusal rate is made of);
- the openings of :mod:`rootdefense.data.refusals` (what the safety expert learned to say):
  the share recognised.

``--extra none`` measures the phrase presets alone (without ``EXTRA_PHRASES``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rootdefense.data import load_answer_pairs
from rootdefense.data.refusals import OPENINGS
from rootdefense.evaluation.judging.refusal import EXTRA_PHRASES, RefusalJudge


def kappa(pairs: list[tuple[bool, bool]]) -> float:
    n = len(pairs)
    agree = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return (agree - chance) / (1 - chance) if chance < 1 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sharegpt", type=int, default=1000)
    ap.add_argument("--extra", choices=["default", "none"], default="default")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    judge = RefusalJudge(extra=EXTRA_PHRASES if args.extra == "default" else ())
    unc = load_answer_pairs("uncensorbench")
    marks = [(ex.answer_kind == "refuse", judge.judge_one(ex.answer).label) for ex in unc]
    benign = load_answer_pairs("sharegpt", args.sharegpt) + load_answer_pairs("mtbench")
    flagged = [(ex.id, judge.matcher.find(ex.answer)) for ex in benign if judge.judge_one(ex.answer).label]
    openings = [o for o in OPENINGS if not judge.judge_one(o).label]
    report = {
        "extra_phrases": list(judge.extra),
        "uncensorbench": {"answers": len(marks), "accuracy": round(sum(a == b for a, b in marks) / len(marks), 3),
                          "kappa": round(kappa(marks), 3),
                          "refusals_missed": sum(a and not b for a, b in marks),
                          "compliances_flagged": sum(b and not a for a, b in marks)},
        "benign": {"answers": len(benign), "flagged": len(flagged),
                   "flagged_share": round(len(flagged) / len(benign), 4),
                   "phrases": sorted({p for _, p in flagged if p})},
        "expert_openings": {"openings": len(OPENINGS), "missed": openings},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
