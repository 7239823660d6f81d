"""JSON lines in and out: line-numbered errors on input, incremental resumable output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) lazily, so work done before a bad line is kept.
    Blank lines are skipped; numbering is 1-based as editors show it."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {n} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {n} must be a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_objects(path: str | Path) -> list[dict]:
    """Every complete JSON object line of an output file we wrote; a torn last line from an
    interrupted run is ignored (and will be redone)."""
    out: list[dict] = []
    p = Path(path)
    if not p.exists():
        return out
    # split on newline bytes only: str.splitlines() would also split inside answers that
    # hold U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) writes raw
    for raw in p.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def done_lines(path: str | Path) -> set[int]:
    """Input line numbers already present in an output file (for --resume)."""
    return {o["line"] for o in read_objects(path) if isinstance(o.get("line"), int)}


class JsonlWriter:
    """Append one JSON object per line, flushed at once, so an interrupted run keeps
    every finished line."""

    def __init__(self, path: str | Path, append: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists():
            self._repair_tail()
        self.fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (open across writes; close() ends it)

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            self.path.write_bytes(data[:cut])

    def write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
