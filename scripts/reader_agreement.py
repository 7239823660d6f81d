"""How well two blind readings of the same answers agree (issue 22, part 4).

FOLDER holds ``key.jsonl`` (each id with the store's label) and ``labels-new.jsonl`` (a second
blind reading, one line per id). Prints JSON: agreement and Cohen's kappa over the four labels
and over help vs not help, and the help counts of each reading.

    python scripts/reader_agreement.py results/judge/reread
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def kappa(a: list, b: list) -> tuple[float, float]:
    """(share equal, Cohen's kappa) of two labelings of the same items."""
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    return round(po, 4), round((po - pe) / (1 - pe), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    folder = Path(ap.parse_args().folder)
    first = {o["id"]: o["label"] for o in map(json.loads, (folder / "key.jsonl").read_text().splitlines())}
    second = {o["id"]: o["label"] for o in map(json.loads, (folder / "labels-new.jsonl").read_text().splitlines())}
    if set(first) != set(second):
        raise SystemExit(f"the readings cover different ids: {len(set(first) ^ set(second))} differ")
    ids = sorted(first)
    a, b = [first[i] for i in ids], [second[i] for i in ids]
    ha, hb = [x == "help" for x in a], [x == "help" for x in b]
    both = sum(x and y for x, y in zip(ha, hb))
    print(json.dumps({
        "answers": len(ids),
        "four_labels": dict(zip(("agreement", "kappa"), kappa(a, b))),
        "help_vs_not": dict(zip(("agreement", "kappa"), kappa(ha, hb))),
        "help": {"first": sum(ha), "second": sum(hb), "both": both,
                 "second_recall_of_first": round(both / max(sum(ha), 1), 4),
                 "second_precision": round(both / max(sum(hb), 1), 4)},
        "pairs": {f"{x} -> {y}": n for (x, y), n in Counter(zip(a, b)).most_common() if x != y},
    }, indent=1))


if __name__ == "__main__":
    main()
