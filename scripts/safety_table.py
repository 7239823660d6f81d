"""Markdown tables of a safety run's summary.json: harmful cells (judged help, refusal, how
caught answers end) and benign cells per wrapper (over-refusal, identical answers, what
caught them). A view of the data; the figures are summary.json's.

    python scripts/safety_table.py results/safety/withhold/summary.json
"""

from __future__ import annotations

import json
import sys


def pct(cell: dict | None) -> str:
    if not cell or cell.get("rate") is None:
        return "-"
    return f"{cell['k']}/{cell['n']} ({100 * cell['rate']:.0f}%)"


def main(path: str) -> None:
    s = json.loads(open(path, encoding="utf-8").read())
    print("| defense | attack | judged help | refusal | caught | caught ending cleanly | caught by finish | loop cut mid-text |")
    print("|---|---|---|---|---|---|---|---|")
    for d, row in s["attack_success"].items():
        for a, c in row["by_attack"].items():
            finish = ", ".join(f"{k} {v}" for k, v in c.get("caught_by_finish", {}).items()) or "-"
            print(f"| {d} | {a} | {pct(c['harmful'])} | {pct(c['refusal'])} | {pct(c.get('caught'))} | "
                  f"{pct(c.get('caught_clean_end'))} | {finish} | {pct(c['loop_cut'])} |")
    print()
    print("| defense | benign set, wrapper | over-refusal (judge) | identical to undefended | degenerate | "
          "rolled back (harm) | loop handed to expert | gate strict |")
    print("|---|---|---|---|---|---|---|---|")
    for d, b in s["benign"].items():
        cells = b.get("by_attack") or {"none": b["all"]}
        for a, c in cells.items():
            print(f"| {d} | {a} | {pct(c['over_refusal'])} | {pct(c['identical_to_none'])} | {pct(c['degenerate'])} | "
                  f"{pct(c['rolled_back'])} | {pct(c['loop_restarted'])} | {pct(c['strict_monitor'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
