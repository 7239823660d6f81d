"""Batch generation over a JSONL file: every input field is kept, results are appended
line by line, and a rerun with ``resume`` skips what is already done."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .errors import InputError
from .jsonl import JsonlWriter, done_lines, read_jsonl


def _count_lines(path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for raw in fh if raw.strip())


def run_batch(defender, cfg, input_path, output_path, resume: bool = False, overwrite: bool = False,
              html: str | None = None, batch_size: int = 1) -> dict:
    """Answer every line; ``batch_size`` > 1 decodes that many lines together (same
    answers, one forward per step for all of them). Lines are written in input order as
    each batch finishes."""
    if not Path(input_path).exists():
        raise InputError(f"input file '{input_path}' does not exist")
    if Path(output_path).exists() and not (resume or overwrite):
        raise InputError(f"output '{output_path}' exists; pass --resume to continue it or --overwrite to replace it")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    skip = done_lines(output_path) if resume else set()
    written, entries = 0, []
    settings = defender.describe()
    with JsonlWriter(output_path, append=resume) as out, \
            tqdm(total=_count_lines(input_path), desc="generating", unit="prompt") as bar:

        def flush(chunk):
            nonlocal written
            if not chunk:
                return
            items = [obj.get("prompt") if "prompt" in obj else obj["messages"] for _, obj in chunk]
            gens = defender.generate_batch(items, cfg) if batch_size > 1 else \
                [defender.generate(obj.get("prompt"), obj.get("messages"), cfg) for _, obj in chunk]
            for (n, obj), gen in zip(chunk, gens, strict=True):
                record = {**obj, "line": n, "text": gen.text, "finish_reason": gen.trace.finish_reason,
                          "trace": gen.trace.to_dict(), "timings": gen.timings, "settings": settings}
                out.write(record)
                written += 1
                bar.update(1)
                if html:
                    label = obj.get("prompt") or obj["messages"][-1]["content"]
                    entries.append({"prompt": label, "label": settings["defense"], "text": gen.text,
                                    "trace": record["trace"], "group": str(n)})
            chunk.clear()

        chunk: list = []
        for n, obj in read_jsonl(input_path):
            if n in skip:
                bar.update(1)
                continue
            if "prompt" not in obj and "messages" not in obj:
                flush(chunk)
                raise InputError(f"{input_path}: line {n} has neither 'prompt' nor 'messages'")
            if "prompt" in obj and not isinstance(obj["prompt"], str):
                flush(chunk)
                raise InputError(f"{input_path}: line {n}: 'prompt' must be a string")
            try:
                defender.encode(obj.get("prompt"), obj.get("messages"), cfg)  # bad lines fail alone, named
            except InputError as exc:
                flush(chunk)
                raise InputError(f"{input_path}: line {n}: {exc}") from exc
            chunk.append((n, obj))
            if len(chunk) >= batch_size:
                flush(chunk)
        flush(chunk)
    if html and entries:
        from .render import write_trace_page

        write_trace_page(html, entries, title="rootdefense batch trace")
    return {"written": written, "skipped": len(skip), "output": str(output_path)}
