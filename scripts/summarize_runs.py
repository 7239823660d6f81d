"""Summarise batch outputs side by side: speed, replacements, and for benign prompts the
share of answers identical to the first (undefended) file. Usage: summarize_runs.py A.jsonl B.jsonl ..."""

import json
import statistics
import sys


def load(path):
    with open(path, encoding="utf-8") as fh:
        return {r["id"]: r for r in map(json.loads, fh)}


runs = {p: load(p) for p in sys.argv[1:]}
base = runs[sys.argv[1]]
print(f"{'run':<28} {'set':<8} {'n':>3} {'tok/s':>7} {'ms/tok':>7} {'replaced/ans':>12} {'identical':>9}")
for path, rows in runs.items():
    for harmful in (True, False):
        sel = [r for r in rows.values() if r["harmful"] == harmful]
        if not sel:
            continue
        tps = statistics.median(r["timings"]["tokens_per_s"] for r in sel)
        mspt = statistics.median(r["timings"]["ms_per_token"] for r in sel)
        rep = statistics.mean(r["trace"]["summary"]["replaced"] for r in sel)
        same = sum(r["text"] == base[r["id"]]["text"] for r in sel) / len(sel)
        print(f"{path[-28:]:<28} {'harmful' if harmful else 'benign':<8} {len(sel):>3} {tps:>7.1f} {mspt:>7.1f} "
              f"{rep:>12.1f} {same:>9.2f}")
