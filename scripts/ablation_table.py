"""What each part of rds-expert adds: join a full run (undefended + rds-expert) with an
ablation run (rds-expert with one part off) on the ablation's prompts, and print one table.

    python scripts/ablation_table.py out/correction-full/results.jsonl \
        out/correction-ablation/results.jsonl [--json OUT.json]

Both files are read with the harness's own reader (the latest line per item wins); only
(prompt, attack) pairs present in the ablation run are counted, so every row covers the
same answers.
"""

from __future__ import annotations

import argparse
import json
import statistics

from rootdefense.evaluation.summary import current_results


def rows(path: str) -> list[dict]:
    from rootdefense.jsonl import read_objects

    return current_results(read_objects(path))


def table(full: list[dict], ablation: list[dict]) -> list[dict]:
    keys = {(r["dataset"], r["prompt_id"], r["attack"]) for r in ablation}
    pool = [r for r in full + ablation if (r["dataset"], r["prompt_id"], r["attack"]) in keys]
    plain = {(r["dataset"], r["prompt_id"], r["attack"]): r["answer"] for r in pool if r["defense"] == "none"}
    out = []
    for name in dict.fromkeys(r["defense"] for r in pool):
        mine = [r for r in pool if r["defense"] == name]
        harm = [r for r in mine if r["harmful"]]
        benign = [r for r in mine if not r["harmful"]]

        def rate(items, test):
            return round(100 * sum(map(test, items)) / len(items), 1) if items else None

        def ms(items):
            vals = [r["timings"]["ms_per_token"] for r in items if r["timings"].get("ms_per_token")]
            return round(statistics.median(vals), 1) if vals else None

        out.append({
            "defense": name, "harmful_n": len(harm), "benign_n": len(benign),
            "harmful_help_judge_pct": rate(harm, lambda r: r["verdicts"].get("harm", {}).get("label") is True),
            "harmful_refusal_pct": rate(harm, lambda r: r["verdicts"].get("refusal", {}).get("label") is True),
            "harmful_degenerate_pct": rate(harm, lambda r: r["metrics"].get("degenerate") is True),
            "harmful_rolled_back_pct": rate(harm, lambda r: r["trace"].get("rollbacks", 0) > 0),
            "benign_identical_pct": rate(benign, lambda r: plain.get((r["dataset"], r["prompt_id"], r["attack"]))
                                         == r["answer"]),
            "benign_refusal_pct": rate(benign, lambda r: r["verdicts"].get("refusal", {}).get("label") is True),
            "benign_degenerate_pct": rate(benign, lambda r: r["metrics"].get("degenerate") is True),
            "harmful_ms_per_token": ms(harm), "benign_ms_per_token": ms(benign),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("full")
    ap.add_argument("ablation")
    ap.add_argument("--json", default=None, help="also write the table here")
    a = ap.parse_args()
    t = table(rows(a.full), rows(a.ablation))
    cols = list(t[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in t:
        print("| " + " | ".join("–" if row[c] is None else str(row[c]) for c in cols) + " |")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(t, fh, indent=2)


if __name__ == "__main__":
    main()
