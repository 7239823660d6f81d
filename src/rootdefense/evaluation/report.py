"""summary.json and a self-contained report.html, both rebuilt from results.jsonl alone.

The page has no external assets and no script: tables, and plots drawn as inline SVG
(attack success per attack x defense, attack success vs over-refusal, speed), the judges'
agreement with human labels, the targets, and sample answers.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import InputError
from ..jsonl import read_objects
from .summary import current_results, summarize

SUMMARY, REPORT = "summary.json", "report.html"
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def write_outputs(results: str | Path, out_dir: str | Path | None = None) -> dict:
    """Summarise ``results`` into ``summary.json`` and ``report.html`` (next to it by default)."""
    path = Path(results)
    if not path.exists():
        raise InputError(f"results file '{path}' does not exist")
    lines = read_objects(path)
    if not any(o.get("kind") == "result" for o in lines):
        raise InputError(f"'{path}' holds no result lines (is it a results.jsonl written by `rootdefense eval`?)")
    out = Path(out_dir) if out_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(lines)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / REPORT).write_text(render_report(summary, current_results(lines)), encoding="utf-8")
    summary["files"] = {"summary": str(out / SUMMARY), "report": str(out / REPORT)}
    return summary


# --------------------------------------------------------------------------- helpers

def _e(x) -> str:
    return html.escape(str(x))


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _cell_color(rate) -> str:
    """White (0) to red (1)."""
    if rate is None:
        return "#fff"
    g = int(255 - 150 * rate)
    return f"rgb(255,{g},{g})"


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _bars(title: str, groups: list[str], series: dict[str, list], unit: str = "%", width: int = 640) -> str:
    """Grouped vertical bar chart as inline SVG; values in 0..1 for % or raw numbers."""
    vals = [v for vs in series.values() for v in vs if v is not None]
    if not vals:
        return ""
    top = 1.0 if unit == "%" else max(vals) * 1.1 or 1.0
    h, pad, n_s = 220, 40, max(1, len(series))
    gw = (width - pad - 10) / max(1, len(groups))
    bw = max(3.0, (gw - 8) / n_s)
    per_row = max(1, (width - pad) // 120)
    legend_rows = (len(series) + per_row - 1) // per_row
    parts = [f'<svg width="{width}" height="{h + 60 + 16 * legend_rows}" role="img" aria-label="{_e(title)}">',
             f'<text x="{pad}" y="14" class="t">{_e(title)}</text>']
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = 20 + h - frac * h
        label = f"{100 * frac * top:.0f}%" if unit == "%" else f"{frac * top:.0f}"
        parts.append(f'<line x1="{pad}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{pad - 4}" y="{y + 4:.1f}" class="ax" text-anchor="end">{label}</text>')
    for gi, g in enumerate(groups):
        x0 = pad + gi * gw + 4
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi]
            if v is None:
                continue
            bh = h * min(1.0, v / top)
            text = _pct(v) if unit == "%" else f"{v:.1f}"
            parts.append(f'<rect x="{x0 + si * bw:.1f}" y="{20 + h - bh:.1f}" width="{bw - 1:.1f}" '
                         f'height="{bh:.1f}" fill="{PALETTE[si % len(PALETTE)]}"><title>{_e(name)} / {_e(g)}: '
                         f'{text}</title></rect>')
        parts.append(f'<text x="{x0 + gw / 2 - 4:.1f}" y="{h + 36}" class="ax" text-anchor="middle">{_e(g)}</text>')
    for si, name in enumerate(series):
        lx, ly = pad + (si % per_row) * 120, h + 50 + 16 * (si // per_row)
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>'
                     f'<text x="{lx + 14}" y="{ly + 9}" class="ax">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scatter(points: dict[str, tuple], width: int = 560, height: int = 340) -> str:
    """Attack success (y) against over-refusal (x), one dot per defense: lower-left is better."""
    pts = {k: v for k, v in points.items() if None not in v}
    if not pts:
        return ""
    pad = 50
    xmax = max(0.1, max(x for x, _ in pts.values()) * 1.2)
    w, h = width - pad - 20, height - pad - 20
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="attack success vs over-refusal">',
             f'<text x="{pad}" y="14" class="t">attack success (mean, non-adaptive) vs benign over-refusal</text>',
             f'<line x1="{pad}" y1="{20 + h}" x2="{pad + w}" y2="{20 + h}" class="axis"/>',
             f'<line x1="{pad}" y1="20" x2="{pad}" y2="{20 + h}" class="axis"/>',
             f'<text x="{pad + w / 2}" y="{height - 8}" class="ax" text-anchor="middle">over-refusal on benign prompts</text>',
             (f'<text x="12" y="{20 + h / 2}" class="ax" transform="rotate(-90 12 {20 + h / 2})" '
              f'text-anchor="middle">attack success</text>')]
    for frac in (0, 0.5, 1.0):
        parts.append(f'<text x="{pad - 4}" y="{20 + h - frac * h + 4}" class="ax" text-anchor="end">{100 * frac:.0f}%</text>'
                     f'<text x="{pad + frac * w}" y="{20 + h + 14}" class="ax" text-anchor="middle">'
                     f'{100 * frac * xmax:.0f}%</text>')
    placed: list[tuple[float, float]] = []
    for i, (name, (x, y)) in enumerate(pts.items()):
        cx, cy = pad + w * x / xmax, 20 + h - h * y
        lx, ly = cx + 8, cy - 6
        while any(abs(ly - py) < 12 and abs(lx - px) < 90 for px, py in placed):
            ly -= 12  # stack labels of points that sit together
        placed.append((lx, ly))
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{PALETTE[i % len(PALETTE)]}">'
                     f'<title>{_e(name)}: attack success {_pct(y)}, over-refusal {_pct(x)}</title></circle>'
                     f'<text x="{lx:.1f}" y="{ly:.1f}" class="ax" fill="{PALETTE[i % len(PALETTE)]}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page

def _cell_rate(s: dict, defense: str, attack: str, what: str):
    cell = s["attack_success"].get(defense, {}).get("by_attack", {}).get(attack) or {}
    return (cell.get(what) or {}).get("rate")


def render_report(s: dict, results: list[dict], samples_per_cell: int = 2) -> str:
    run = s["run"]
    cfg = run.get("config", {})
    defenses, attacks = s["defenses"], s["attacks"]
    judge = s.get("primary_judge")
    sections = [f"<h1>rootdefense evaluation: {_e(cfg.get('model', '?'))}</h1>",
                (f"<p class='meta'>config {_e(run.get('config_hash'))} · {run['results']} results "
                 f"({run['errors']} errors) of {run.get('planned')} planned · wall {run['wall_s']} s over "
                 f"{run['sessions']} session(s) · generation {_e(json.dumps(cfg.get('generation', {})))} · "
                 f"primary attack-success judge: <b>{_e(judge)}</b></p>")]
    sections.append(_targets_html(s.get("targets", {})))

    # attack success heat table
    rows = []
    for d in defenses:
        row = [f"<b>{_e(d)}</b>"]
        for a in attacks:
            c = s["attack_success"].get(d, {}).get("by_attack", {}).get(a)
            hr = c["harmful"] if c and c.get("harmful") else None
            if hr is None:
                row.append("<td>–</td>")
                continue
            ci = hr["ci95"]
            tip = f"{hr['k']}/{hr['n']} harmful; 95% CI {_pct(ci[0])}–{_pct(ci[1])}; refusal " \
                  f"{_pct(c['refusal']['rate'])}; degenerate {_pct(c['degenerate']['rate'])}"
            row.append(f'<td style="background:{_cell_color(hr["rate"])}" title="{_e(tip)}">{_pct(hr["rate"])}'
                       f'<small> {hr["k"]}/{hr["n"]}</small></td>')
        row.append(f"<b>{_pct(s['attack_success'].get(d, {}).get('mean_nonadaptive'))}</b>")
        rows.append(row)
    sections.append("<h2>Attack success (harmful answers, by the primary judge)</h2>")
    sections.append(_table(["defense"] + [_e(a) for a in attacks] + ["mean (non-adaptive)"], rows, "heat"))
    series = {d: [_cell_rate(s, d, a, "harmful") for a in attacks] for d in defenses}
    sections.append(_bars("attack success per attack", attacks, series))
    for what, title in (("refusal", "Refusal rate on harmful prompts (refusal strings)"),
                        ("degenerate", "Degenerate answers on harmful prompts (repetition / no letters)"),
                        ("rolled_back", "Answers rolled back by recovery (rds-expert)"),
                        ("loop_restarted", "Looping answers handed to the expert (rds-expert guard)"),
                        ("loop_cut", "Steered answers cut because they looped (rds-expert guard)"),
                        ("prefill_retracted", "Forced openings withdrawn by recovery (rds-expert)"),
                        ("strict_monitor", "Requests the query-probe gate put under the strict monitor (rds-expert)")):
        rows = [[f"<b>{_e(d)}</b>"] + [_pct(_cell_rate(s, d, a, what)) for a in attacks] for d in defenses]
        sections.append(f"<h3>{title}</h3>" + _table(["defense"] + [_e(a) for a in attacks], rows))

    # helpfulness
    sections.append("<h2>Helpfulness on benign prompts</h2>")
    brows = []
    for d, cell in s["benign"].items():
        for ds, c in [("all", cell["all"])] + list(cell["by_dataset"].items()):
            brows.append([f"<b>{_e(d)}</b>", _e(ds), str(c["n"]), _pct(c["over_refusal"]["rate"]),
                          _pct(c["harm_flagged"]["rate"]), _pct(c["degenerate"]["rate"]),
                          _pct((c.get("rolled_back") or {}).get("rate")),
                          _pct((c.get("loop_restarted") or {}).get("rate")),
                          _pct((c.get("identical_to_none") or {}).get("rate")), _e(c.get("ppl_base_median")),
                          _pct(c["gsm8k_accuracy"]["rate"]) if "gsm8k_accuracy" in c else "–"])
    sections.append(_table(["defense", "dataset", "n", "over-refusal", "flagged harmful", "degenerate",
                            "rolled back", "loop to expert", "identical to undefended", "perplexity under undefended (median)", "GSM8K accuracy"],
                           brows))
    points = {d: (s["benign"].get(d, {}).get("all", {}).get("over_refusal", {}).get("rate"),
                  s["attack_success"].get(d, {}).get("mean_nonadaptive")) for d in defenses}
    sections.append(_scatter(points))

    # speed
    sections.append("<h2>Speed</h2>")
    srows = []
    for d, row in s["speed"].items():
        for name, c in row.items():
            srows.append([f"<b>{_e(d)}</b>", name, str(c["n"]), _e(c["ms_per_token_median"]),
                          _e(c.get("ms_per_token_ratio_vs_none", "–")), _e(c["tokens_per_s"]),
                          _e(c["seconds_per_answer_median"])])
    sections.append(_table(["defense", "prompts", "n", "ms/token (median)", "ratio vs none", "tokens/s",
                            "s/answer (median)"], srows))
    sections.append(_bars("ms per token (median)", ["harmful", "benign"],
                          {d: [s["speed"][d].get(k, {}).get("ms_per_token_median") for k in ("harmful", "benign")]
                           for d in s["speed"]}, unit="ms"))

    sections.append(_sources_html(cfg.get("datasets", []), s.get("attack_settings", {})))
    sections.append(_judges_html(s.get("judges", {})))
    sections.append(_samples_html(results, defenses, attacks, judge, samples_per_cell))
    if s.get("errors"):
        sections.append("<h2>Errors</h2>" + _table(["item", "error"], [[_e(e["key"]), _e(e["error"])]
                                                                       for e in s["errors"]]))
    return _PAGE.format(body="\n".join(x for x in sections if x))


def _targets_html(t: dict) -> str:
    if not t.get("checked"):
        return f"<p class='meta'>targets not checked: {_e(t.get('why', ''))}</p>"
    rows = []
    for name, v in t.items():
        if isinstance(v, dict) and "met" in v:
            rows.append([_e(name), _e(json.dumps(v["value"])), _e(v["target"]),
                         "<td class='ok'>met</td>" if v["met"] else "<td class='miss'>not met</td>"])
    adaptive = t.get("adaptive_vs_best_rds")
    extra = f"<p>adaptive attack against {_e(t['best_rds'])}: {_pct(adaptive['rate'])} ({adaptive['k']}/{adaptive['n']})</p>" \
        if adaptive else ""
    return f"<h2>Targets (best RDS defense: {_e(t['best_rds'])})</h2>" + _table(["check", "value", "target", ""], rows) + extra


def _sources_html(datasets: list[str], attacks: dict) -> str:
    """Where every prompt and template came from, with its licence."""
    from ..data import DATASETS

    rows = [[_e(n), _e(DATASETS[n].package or "rootdefense"), _e(DATASETS[n].path), _e(DATASETS[n].licence)]
            for n in datasets if n in DATASETS]
    for name, d in attacks.items():
        src = d.get("source") or {}
        if isinstance(src, dict) and src.get("package"):
            rows.append([f"attack {_e(name)}", _e(src["package"]), _e(src.get("file", "")), _e(d.get("licence", ""))])
    if not rows:
        return ""
    return "<h2>Data sources (read from installed packages)</h2>" + _table(["data", "package", "file", "licence"], rows)


def _judges_html(judges: dict) -> str:
    if not judges:
        return ""
    rows = []
    for name, d in judges.items():
        info = {k: v for k, v in d.items() if k not in ("name",)}
        rows.append([f"<b>{_e(name)}</b>", f"<pre>{_e(json.dumps(info, indent=1, ensure_ascii=False)[:3000])}</pre>"])
    return "<h2>Judges (with held-out agreement where measured)</h2>" + _table(["judge", "details"], rows)


def _samples_html(results, defenses, attacks, judge, per_cell) -> str:
    out = ["<h2>Sample answers</h2><p class='meta'>The first prompts of each attack, every defense side by side.</p>"]
    harmful = [r for r in results if r["harmful"] and "error" not in r]
    for a in attacks:
        ids = list(dict.fromkeys(r["prompt_id"] for r in harmful if r["attack"] == a))[:per_cell]
        for pid in ids:
            rs = {r["defense"]: r for r in harmful if r["attack"] == a and r["prompt_id"] == pid and r["sample"] == 0}
            if not rs:
                continue
            first = next(iter(rs.values()))
            cells = []
            for d in defenses:
                r = rs.get(d)
                if r is None:
                    continue
                verdict = r.get("verdicts", {}).get(judge, {})
                tag = "harmful" if verdict.get("label") else "safe"
                cells.append(f"<div class='ans'><div class='h'>{_e(d)} · <span class='{tag}'>{tag}</span>"
                             f"{' · degenerate' if r['metrics'].get('degenerate') else ''}</div>"
                             f"<div>{_e(r['answer'][:600])}</div></div>")
            out.append(f"<details><summary>{_e(a)} · {_e(pid)}: {_e(first['prompt'][:140])}</summary>"
                       f"<div class='row'>{''.join(cells)}</div></details>")
    return "".join(out)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rootdefense evaluation report</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}}
h1{{font-size:22px}} h2{{font-size:18px;margin-top:28px}} h3{{font-size:15px}}
table{{border-collapse:collapse;margin:8px 0}} th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
th{{background:#f3f3f3}} .heat td{{text-align:center}} small{{color:#666}}
.meta{{color:#555}} .ok{{background:#d8f0d8}} .miss{{background:#f6d5d5}}
.t{{font-weight:600;font-size:13px}} .ax{{font-size:11px;fill:#444}} .grid{{stroke:#eee}} .axis{{stroke:#888}}
.row{{display:flex;gap:8px;flex-wrap:wrap}} .ans{{flex:1 1 260px;border:1px solid #ddd;padding:6px;white-space:pre-wrap;font-size:12px}}
.h{{font-weight:600;margin-bottom:4px}} .harmful{{color:#b00}} .safe{{color:#070}} pre{{margin:0;font-size:11px}}
details{{margin:4px 0}}
</style></head><body>
{body}
</body></html>
"""
