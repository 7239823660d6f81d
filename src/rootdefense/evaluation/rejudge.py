"""Judge a finished run again: new or retrained judges over the stored answers, without
generating anything. Verdicts are data in results.jsonl, so a run outlives its judges."""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError
from ..jsonl import JsonlWriter, read_objects
from .config import EvalConfig


def rejudge(results: str | Path, judges: list[str], out: str | Path, options: dict | None = None,
            batch: int = 64, progress: bool = True) -> Path:
    """Write ``out``: ``results`` with the verdicts of ``judges`` recomputed (or added) on
    every answer; the run header and the parts line record the judges as they are now, so
    ``rootdefense eval --resume`` on ``out`` continues with them."""
    from .judging import JUDGES, make_judge

    unknown = [n for n in judges if n not in JUDGES]
    if unknown or not judges:
        raise InputError(f"unknown judge name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid: {', '.join(JUDGES)}")
    src, dst = Path(results), Path(out)
    if not src.exists():
        raise InputError(f"results file '{src}' does not exist")
    if dst.exists() and dst.resolve() != src.resolve():
        raise InputError(f"'{dst}' exists; choose another output file")
    lines = read_objects(src)
    headers = [o for o in lines if o.get("kind") == "run"]
    if not headers:
        raise InputError(f"'{src}' has no run header; it was not written by `rootdefense eval`")
    options = options or {}
    parts = {}
    for name in judges:
        judge = make_judge(name, **options.get(name, {}))
        judge.setup()
        parts[name] = judge
    todo = [o for o in lines if o.get("kind") == "result" and "answer" in o]
    with tqdm(total=len(todo) * len(parts), desc="judging", unit="answer", disable=not progress) as bar:
        for name, judge in parts.items():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                verdicts = judge.judge([r["prompt"] for r in chunk], [r["answer"] for r in chunk])
                for r, v in zip(chunk, verdicts):
                    r.setdefault("verdicts", {})[name] = v.to_dict()
                bar.update(len(chunk))
    described = {name: judge.describe() for name, judge in parts.items()}
    for o in lines:
        if o.get("kind") == "run":
            cfg = dict(o["config"])
            cfg["judges"] = list(dict.fromkeys(list(cfg.get("judges", [])) + list(judges)))
            cfg["options"] = {**cfg.get("options", {}), **{n: options[n] for n in judges if n in options}}
            new = EvalConfig.from_dict(cfg)
            o.update(config=new.to_dict(), config_hash=new.fingerprint(), answer_settings=new.answer_settings())
        elif o.get("kind") == "parts":
            o["judges"] = {**o.get("judges", {}), **described}
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    with JsonlWriter(tmp, append=False) as w:
        for o in lines:
            if o.get("kind") == "result" and "config_hash" in o:
                o["config_hash"] = headers[-1]["config_hash"]
            w.write(o)
    os.replace(tmp, dst)
    return dst
