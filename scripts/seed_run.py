"""Start a new evaluation folder with some defenses' answers copied from an earlier run, so
that `rootdefense eval --resume` answers only the defenses that changed.

    python scripts/seed_run.py OLD/results.jsonl NEW_DIR --keep none

Copies the earlier run's header, its parts line restricted to the kept defenses (and the
judges), and every result of the kept defenses. Resuming then checks the config as usual;
the other defenses have no earlier parts, so their current probe/expert/settings are used
and recorded. Use it only when the kept defenses' code path did not change (e.g. the
undefended greedy baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--keep", default="none", help="comma-separated defenses whose answers are copied")
    args = ap.parse_args()
    keep = set(args.keep.split(","))
    target = args.out / "results.jsonl"
    if target.exists():
        raise SystemExit(f"{target} exists; seed an empty folder")
    lines = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    runs = [o for o in lines if o.get("kind") == "run"]
    parts = [o for o in lines if o.get("kind") == "parts"]
    if not runs or not parts:
        raise SystemExit(f"{args.results} has no run header or parts line")
    part = dict(parts[-1])
    part["defenses"] = {k: v for k, v in part.get("defenses", {}).items() if k in keep}
    kept = [o for o in lines if o.get("kind") == "result" and o.get("defense") in keep]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in [runs[0], part, *kept])
    print(f"{target}: {len(kept)} results of {', '.join(sorted(keep))} copied from {args.results}")


if __name__ == "__main__":
    main()
