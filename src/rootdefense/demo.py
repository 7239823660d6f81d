"""`rootdefense demo`: held-out AdvBench and benign prompts, undefended vs RDS side by side,
with a trace page. Everything comes from the cache that `rootdefense prepare` fills."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import paths
from .api import Defender
from .data.split import held_out
from .decoding import GenerationConfig
from .decoding.streamer import Streamer
from .jsonl import JsonlWriter
from .models import load_model
from .render import write_trace_page


def demo_prompts(n_harmful: int = 5, n_benign: int = 5) -> list[tuple[str, str]]:
    """Prompts no probe was trained on: the test split of AdvBench; MT-bench turn 1 and the
    eval half of the benign-but-edgy set."""
    harmful = [e.prompt for e in held_out("advbench", n_harmful)]
    benign = [e.prompt for e in held_out("mtbench", (n_benign + 1) // 2) + held_out("edgy")][:n_benign]
    return [("harmful", p) for p in harmful] + [("benign", p) for p in benign]


def _defended_name(d: Defender) -> str:
    s = d.settings
    if s.defense == "rds-expert":
        expert = "expert" if s.correction.get("use_expert", True) else "no expert yet"
        return f"rds-expert ({'tuned' if s.source.startswith('tuned') else 'fallback'}, {expert})"
    return f"rds ({s.rule})"


def run_demo(max_new_tokens: int = 64, out: str | None = None, rule: str | None = None) -> Path:
    """Undefended vs the model's default defense (its tuned settings; ``rule``: the token
    rule instead)."""
    console = Console()
    out_dir = Path(out) if out else paths.demo_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with console.status("loading the model, its probe and the defense ..."):
        lm = load_model("smollm2-135m")
        plain = Defender.load(lm=lm, defense="none")
        rds = Defender.load(lm=lm, **({"defense": "rds", "rule": rule} if rule else {}))
    label = _defended_name(rds)
    console.print(f"defense: {label}; settings from {rds.settings.source}")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    prompts = demo_prompts()
    entries, rows = [], []
    total = 2 * len(prompts)
    console.print(f"answering {len(prompts)} prompts twice (undefended, then {label}), up to {max_new_tokens} "
                  "tokens each" + ("; rds-expert shows an answer's tokens once no rollback can withdraw them"
                                   if rds.settings.defense == "rds-expert" else ""))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("answers; {task.fields[tokens]} tokens final"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress, \
            JsonlWriter(out_dir / "demo.jsonl", append=False) as log:
        task = progress.add_task("generating", total=total, tokens=0)
        for i, (kind, prompt) in enumerate(prompts):
            pair = []
            for name, d in (("undefended", plain), (label, rds)):
                progress.update(task, description=f"{kind} {i + 1}/{len(prompts)}: {name}", tokens=0)
                gen = d.generate(prompt, config=cfg, streamer=_TokenCount(progress, task))
                pair.append(gen)
                if not console.is_terminal:  # no live display: one line per answer instead
                    console.print(f"[{len(entries) + 1}/{total}] {kind} {i + 1}: {name}: {len(gen.token_ids)} "
                                  f"tokens, {gen.timings['tokens_per_s']} tok/s")
                rec = {"kind": kind, "prompt": prompt, "defense": name, **gen.to_dict(), "settings": d.describe()}
                log.write(rec)
                meta = {"tok/s": gen.timings["tokens_per_s"]}
                desc = d.describe()
                meta.update({k: desc[k] for k in ("tau", "k", "lambda", "window") if k in desc})
                entries.append({"prompt": prompt, "label": name, "text": gen.text, "trace": rec["trace"],
                                "group": f"{kind} {i + 1}", "meta": meta})
                progress.advance(task)
            rows.append((kind, prompt, pair[0], pair[1]))
    table = Table(title=f"undefended vs {label} on {lm.model_id}, greedy, {max_new_tokens} new tokens",
                  show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column("undefended", ratio=3)
    table.add_column(label, ratio=3)
    for kind, prompt, a, b in rows:
        table.add_row(f"[bold]{kind}[/]\n{_short(prompt, 160)}", _short(a.text, 300),
                      _short(b.text, 300) + f"\n[dim]{_what_changed(b)}[/]")
    console.print(table)
    speed_a = sum(e["meta"]["tok/s"] or 0 for e in entries[0::2]) / len(rows)
    speed_b = sum(e["meta"]["tok/s"] or 0 for e in entries[1::2]) / len(rows)
    page = write_trace_page(out_dir / "trace.html", entries, title=f"rootdefense demo: {lm.model_id}")
    console.print(f"mean speed: undefended {speed_a:.1f} tok/s, {label} {speed_b:.1f} tok/s")
    console.print(f"answers (JSONL): {out_dir / 'demo.jsonl'}")
    console.print(f"trace page: {page}")
    return page


class _TokenCount(Streamer):
    """Shows how many tokens of the answer being decoded are final. rds-expert holds a
    watched answer until no rollback can withdraw it, so its count moves in larger steps."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task, self.tokens = progress, task, 0

    def put(self, text: str, steps: list) -> None:
        self.tokens += len(steps)
        self.progress.update(self.task, tokens=self.tokens)


def _what_changed(gen) -> str:
    s = gen.trace.summary()
    parts = [f"{s['replaced']} tokens replaced"]
    if s.get("rollbacks"):
        parts.append(f"rolled back {s['rollbacks']}x")
    if s.get("degeneration_stops"):
        parts.append("loop cut")
    if s.get("withheld"):
        parts.append("withheld: the expert's correction never came (content_filter)")
    return ", ".join(parts)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
