"""Self-contained HTML page of decoding traces, token by token.

Each answer is drawn as one ``<span>`` per decoding step, its background shaded by the
probe's harm score (white -> amber -> red; unshaded when the harm is unknown). Tokens
the decision rule replaced are outlined and their hover text names what the model itself
wanted. Entries sharing a ``group`` (e.g. one prompt decoded undefended and defended) sit
side by side in columns under the prompt, shown once.

The page is one file: inline CSS, no script, no external resource; it works offline.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["harm_color", "render_trace_page", "write_trace_page"]

# Colour scale for harm in [0, 1]; the legend's gradient uses the same stops.
_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (255, 255, 255)),
    (0.5, (253, 224, 138)),
    (1.0, (248, 113, 113)),
)
_REPLACED_COLOR = "#1d4ed8"


# --------------------------------------------------------------------------- helpers


def _clean(text: Any) -> str:
    """Any value -> str safe to put in an HTML document (after escaping).

    Lone surrogates (from byte-level decoding) become U+FFFD and C0 control characters
    other than tab/newline/CR become their visible Unicode "control picture".
    """
    s = "" if text is None else str(text)
    s = s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        s = "".join(
            c if c in "\t\n\r" or (32 <= ord(c) != 127) else chr(0x2400 + (ord(c) if ord(c) < 32 else 33))
            for c in s
        )
    return s


def _e(text: Any) -> str:
    """Escape for text and for double/single-quoted attribute values."""
    return escape(_clean(text), quote=True)


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _fmt(x: Any, digits: int = 2) -> str:
    """Short human number: 0.81, 0.0031 -> 3.1e-03, None -> n/a."""
    v = _num(x)
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) < 10 ** (-digits):
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _fmt_meta(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_meta(x) for x in v)
    return str(v)


def _quote(token: Any) -> str:
    """A token as a double-quoted literal with \\n, \\t, quotes made visible."""
    return json.dumps(_clean(token), ensure_ascii=False)


def harm_color(harm: Any) -> str | None:
    """Background colour (``#rrggbb``) for a harm score in [0, 1]; None when unknown."""
    h = _num(harm)
    if h is None:
        return None
    h = min(1.0, max(0.0, h))
    for (x0, c0), (x1, c1) in itertools.pairwise(_STOPS):
        if h <= x1:
            t = (h - x0) / (x1 - x0)
            rgb = (round(a + (b - a) * t) for a, b in zip(c0, c1))
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#{:02x}{:02x}{:02x}".format(*_STOPS[-1][1])


def _trace_dict(trace: Any) -> dict:
    if trace is None:
        return {"summary": {}, "steps": []}
    if hasattr(trace, "to_dict"):
        trace = trace.to_dict()
    return trace if isinstance(trace, dict) else {"summary": {}, "steps": []}


def _summary(trace: dict) -> dict:
    """The trace's summary, recomputed from its steps where a field is missing."""
    steps = trace.get("steps") or []
    harms = [h for h in (_num(s.get("harm")) for s in steps) if h is not None]
    computed = {
        "tokens": len(steps),
        "replaced": sum(bool(s.get("replaced")) for s in steps),
        "max_harm": max(harms) if harms else None,
        "mean_harm": sum(harms) / len(harms) if harms else None,
        "finish_reason": None,
    }
    given = trace.get("summary") or {}
    return {k: given.get(k, v) if given.get(k) is not None else v for k, v in computed.items()}


# --------------------------------------------------------------------------- pieces


def _token_span(i: int, step: dict) -> str:
    token = _clean(step.get("token", ""))
    harm = _num(step.get("harm"))
    prob = step.get("prob")
    replaced = bool(step.get("replaced"))
    classes = ["tok"]
    if harm is None:
        classes.append("nh")
    if replaced:
        classes.append("rep")
    if token == "":
        classes.append("empty")
    elif "\n" in token and token.strip() == "":
        classes.append("nl")

    if replaced:
        tip = (
            f"model wanted {_quote(step.get('original', ''))} "
            f"(p={_fmt(step.get('original_prob'))}, harm={_fmt(step.get('original_harm'))})"
            f" -> chose {_quote(token)} (p={_fmt(prob)}, harm={_fmt(harm)})"
        )
    else:
        tip = f"{_quote(token)} p={_fmt(prob)} harm={_fmt(harm)}"
    extra = [f"step {i}", f"id {step.get('token_id', '?')}"]
    cands = step.get("candidates")
    if isinstance(cands, int) and cands > 1:
        extra.append(f"{cands} candidates")
    tip += "\n" + " · ".join(extra)

    attrs = [f'class="{" ".join(classes)}"', f'title="{_e(tip)}"']
    color = harm_color(harm)
    if color:
        attrs.append(f'style="background:{color}"')
        attrs.append(f'data-harm="{harm:.4f}"')
    if replaced:
        attrs.append(f'data-original="{_e(step.get("original", ""))}"')
    return f"<span {' '.join(attrs)}>{escape(token, quote=False)}</span>"


def _sparkline(steps: list[dict]) -> str:
    """Harm over the steps as a small inline SVG; replaced steps as blue ticks."""
    n = len(steps)
    harms = [_num(s.get("harm")) for s in steps]
    if n < 2 or all(h is None for h in harms):
        return ""
    pts = " ".join(
        f"{i + 0.5:g},{100 - 100 * min(1.0, max(0.0, h)):.1f}" for i, h in enumerate(harms) if h is not None
    )
    ticks = "".join(
        f'<line x1="{i + 0.5:g}" y1="0" x2="{i + 0.5:g}" y2="100" class="sp-rep"/>'
        for i, s in enumerate(steps)
        if s.get("replaced")
    )
    return (
        '<div class="spark" title="harm per token (left to right); blue ticks: replaced tokens">'
        f'<svg viewBox="0 0 {n} 100" preserveAspectRatio="none" role="img" aria-label="harm per token">'
        f'<line x1="0" y1="50" x2="{n}" y2="50" class="sp-mid"/>{ticks}'
        f'<polyline points="{pts}" class="sp-line"/></svg></div>'
    )


def _stats(summary: dict) -> str:
    items = []
    ntok = summary.get("tokens", 0)
    items.append(f'<li><b>{_e(ntok)}</b> token{"" if ntok == 1 else "s"}</li>')
    rep = summary.get("replaced") or 0
    items.append(f'<li class="{"st-rep" if rep else ""}"><b>{_e(rep)}</b> replaced</li>')
    for key, name in (("max_harm", "max harm"), ("mean_harm", "mean harm")):
        v = summary.get(key)
        color = harm_color(v)
        sw = f'<i class="sw" style="background:{color}"></i>' if color else ""
        items.append(f"<li>{sw}{name} <b>{_e(_fmt(v))}</b></li>")
    fin = summary.get("finish_reason")
    if fin:
        items.append(f"<li>finish <b>{_e(fin)}</b></li>")
    return f'<ul class="stats">{"".join(items)}</ul>'


def _meta(meta: Any) -> str:
    if not isinstance(meta, dict) or not meta:
        return ""
    items = "".join(
        f'<div class="kv"><dt>{_e(k)}</dt><dd>{_e(_fmt_meta(v))}</dd></div>' for k, v in meta.items()
    )
    return f'<dl class="meta">{items}</dl>'


def _prompt_block(prompt: Any, cls: str = "prompt") -> str:
    return (
        f'<div class="{cls}"><div class="prompt-label">Prompt</div>'
        f'<div class="prompt-text">{_e(prompt)}</div></div>'
    )


def _entry(entry: dict, show_prompt: bool) -> str:
    trace = _trace_dict(entry.get("trace"))
    steps = [s if isinstance(s, dict) else getattr(s, "to_dict", dict)() for s in trace.get("steps") or []]
    summary = _summary({"summary": trace.get("summary"), "steps": steps})
    label = entry.get("label") or "answer"
    text = _clean(entry.get("text", ""))

    undefended = all(_num(s.get("harm")) is None for s in steps) and not summary.get("replaced")
    kind = "undef" if undefended else "def"
    parts = [f'<article class="entry {kind}">', '<header class="entry-head">']
    parts.append(f'<h2 class="label">{_e(label)}</h2>')
    parts.append(_meta(entry.get("meta")))
    parts.append(_stats(summary))
    parts.append(_sparkline(steps))
    parts.append("</header>")
    if show_prompt and entry.get("prompt"):
        parts.append(_prompt_block(entry.get("prompt"), "prompt inner"))
    withheld = [e for e in trace.get("events") or [] if isinstance(e, dict) and e.get("type") == "withhold"]
    for e in withheld:
        parts.append(
            '<div class="withheld"><div class="prompt-label">withheld: the steered text never carried the '
            f'expert\'s correction (highest lift {_e(_fmt(_num(e.get("lift"))))} nats, needed '
            f'{_e(_fmt(_num(e.get("end_lift"))))})</div><del>{escape(str(e.get("dropped_text", "")), quote=False)}</del></div>'
        )
    if steps:
        spans = "".join(_token_span(i, s) for i, s in enumerate(steps))
        parts.append(f'<div class="answer">{spans}</div>')
        if text:
            parts.append(
                '<details class="plain"><summary>plain text</summary>'
                f'<pre>{escape(text, quote=False)}</pre></details>'
            )
    elif withheld:
        parts.append('<p class="note">the answer is empty: everything steered was withheld</p>')
    else:
        parts.append('<p class="note">no per-token trace for this answer</p>')
        parts.append(f'<div class="answer plain-only">{escape(text, quote=False)}</div>')
    parts.append("</article>")
    return "".join(parts)


def _groups(entries: Iterable[dict]) -> list[list[dict]]:
    """Entries with the same ``group`` together, in order of first appearance;
    an entry without a group is a group of its own."""
    order: list[list[dict]] = []
    index: dict[str, int] = {}
    for e in entries:
        g = e.get("group")
        if g is None or g == "":
            order.append([e])
            continue
        key = str(g)
        if key not in index:
            index[key] = len(order)
            order.append([])
        order[index[key]].append(e)
    return order


def _group(n: int, members: list[dict]) -> str:
    prompts = [_clean(m.get("prompt", "")) for m in members]
    same = len(set(prompts)) == 1
    gid = members[0].get("group")
    head = ""
    if gid is not None and gid != "" and str(gid) != prompts[0]:
        head = f'<div class="group-id">group {_e(gid)}</div>'
    parts = [f'<section class="group" id="group-{n}">', head]
    if same and prompts[0]:
        parts.append(_prompt_block(prompts[0]))
    cols = len(members)
    parts.append(f'<div class="cols" style="--cols:{cols}" data-cols="{cols}">')
    parts.extend(_entry(m, show_prompt=not same) for m in members)
    parts.append("</div></section>")
    return "".join(parts)


def _legend() -> str:
    stops = ", ".join(f"{harm_color(x)} {x * 100:g}%" for x, _ in _STOPS)
    return (
        '<div class="legend" aria-label="legend">'
        '<div class="lg-item"><span class="lg-title">harm</span>'
        '<span class="lg-scale"><span>0</span>'
        f'<span class="lg-bar" style="background:linear-gradient(to right, {stops})"></span>'
        "<span>1</span></span></div>"
        '<div class="lg-item"><span class="tok nh lg-sample">tok</span> harm unknown (undefended)</div>'
        f'<div class="lg-item"><span class="tok rep lg-sample" style="background:{harm_color(0.1)}">tok</span>'
        " replaced by the defense &mdash; hover for the model&rsquo;s own choice</div>"
        '<div class="lg-item lg-hint">hover any token for its probability and harm</div>'
        "</div>"
    )


_CSS = """
:root{--fg:#1f2328;--muted:#5c6370;--bg:#f6f7f9;--card:#fff;--line:#e3e6ea;--rep:%(rep)s;
--mono:ui-monospace,SFMono-Regular,"JetBrains Mono",Menlo,Consolas,"Liberation Mono",monospace;}
*{box-sizing:border-box}
html{background:var(--bg);color:var(--fg)}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.page-head{background:var(--card);border-bottom:1px solid var(--line);padding:18px 28px 14px}
.page-head h1{margin:0 0 2px;font-size:22px;font-weight:650;letter-spacing:-.01em}
.sub{margin:0 0 10px;color:var(--muted);font-size:13px}
.legend{display:flex;flex-wrap:wrap;gap:8px 22px;align-items:center;font-size:13px;color:var(--muted)}
.lg-item{display:flex;align-items:center;gap:7px}
.lg-title{font-weight:600;color:var(--fg)}
.lg-scale{display:inline-flex;align-items:center;gap:6px;font-family:var(--mono);font-size:12px}
.lg-bar{display:inline-block;width:160px;height:12px;border-radius:3px;border:1px solid #d0d4da}
.lg-sample{font-family:var(--mono);font-size:13px;color:var(--fg)}
.lg-sample.nh{border:1px dashed #c4c8ce}
.lg-hint{font-style:italic}
main{padding:20px 28px 40px;max-width:1800px;margin:0 auto}
.group{margin:0 0 28px}
.group-id{font-size:12px;color:var(--muted);font-family:var(--mono);margin:0 0 4px}
.prompt{background:#eef2f7;border:1px solid #d8dee6;border-left:4px solid #64748b;border-radius:8px;
padding:10px 14px;margin:0 0 12px}
.prompt.inner{margin:0 0 10px;background:#f3f5f8}
.prompt-label{font-size:11px;text-transform:uppercase;letter-spacing:.08em;color:var(--muted);font-weight:600}
.prompt-text{white-space:pre-wrap;overflow-wrap:anywhere;font-size:14.5px}
.cols{display:grid;grid-template-columns:repeat(var(--cols,1),minmax(0,1fr));gap:16px;align-items:start}
.entry{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px 12px;
box-shadow:0 1px 2px rgba(16,24,40,.04);min-width:0;border-top:4px solid #94a3b8}
.entry.def{border-top-color:var(--rep)}
.entry-head{margin:0 0 10px}
.label{margin:0 0 4px;font-size:16px;font-weight:650}
.meta{display:flex;flex-wrap:wrap;gap:4px 6px;margin:0 0 6px;font-size:12px}
.kv{display:inline-flex;border:1px solid var(--line);border-radius:999px;overflow:hidden}
.kv dt{background:#f1f3f5;color:var(--muted);padding:1px 7px}
.kv dd{margin:0;padding:1px 8px;font-family:var(--mono);font-size:11.5px;line-height:18px}
.stats{display:flex;flex-wrap:wrap;gap:4px 14px;list-style:none;margin:0;padding:0;font-size:13px;color:var(--muted)}
.stats b{color:var(--fg);font-weight:600;font-variant-numeric:tabular-nums}
.stats .st-rep b{color:var(--rep)}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;border:1px solid #d0d4da;margin-right:5px;vertical-align:-1px}
.spark{margin:8px 0 0;height:26px;border:1px solid var(--line);border-radius:4px;background:#fcfcfd}
.spark svg{display:block;width:100%%;height:100%%}
.sp-line{fill:none;stroke:#dc2626;stroke-width:1.5;vector-effect:non-scaling-stroke;stroke-linejoin:round}
.sp-mid{stroke:#e5e7eb;stroke-width:1;vector-effect:non-scaling-stroke;stroke-dasharray:3 3}
.sp-rep{stroke:var(--rep);stroke-width:1.5;vector-effect:non-scaling-stroke;opacity:.55}
.answer{font-family:var(--mono);font-size:13.5px;line-height:1.75;white-space:pre-wrap;overflow-wrap:anywhere;
border-top:1px solid var(--line);padding-top:10px}
.answer.plain-only{font-family:inherit}
.tok{border-radius:2px;padding:1px 0;cursor:default}
.tok:hover{outline:1px solid #334155;outline-offset:0}
.tok.rep{outline:1.5px solid var(--rep);outline-offset:-1px;text-decoration:underline wavy var(--rep);
text-decoration-thickness:1px;text-underline-offset:3px;cursor:help}
.tok.rep:hover{outline-width:2px}
.tok.empty::after{content:"\\2205";color:#9aa0a6}
.tok.nl::before{content:"\\21B5";color:#b0b5bb;font-size:11px}
.note{color:var(--muted);font-size:13px;font-style:italic;margin:0 0 6px}
.withheld{background:#fdf2f2;border:1px solid #f1c0c0;border-radius:6px;padding:6px 10px;margin:0 0 8px;
font-size:12.5px;white-space:pre-wrap;overflow-wrap:anywhere}
.withheld del{color:#8a1c1c}
.plain{margin-top:10px;font-size:12.5px}
.plain summary{cursor:pointer;color:var(--muted)}
.plain pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f8f9fa;border:1px solid var(--line);border-radius:6px;
padding:8px 10px;margin:6px 0 0;font-size:12.5px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:0 0 24px}
@media (max-width:900px){.cols{grid-template-columns:minmax(0,1fr)}main,.page-head{padding-left:14px;padding-right:14px}}
@media print{html{background:#fff}.entry{box-shadow:none;break-inside:avoid}}
""" % {"rep": _REPLACED_COLOR}  # noqa: UP031 (CSS is full of braces; "%%" marks its percent signs)


# --------------------------------------------------------------------------- API


def render_trace_page(entries: list[dict], title: str = "rootdefense trace") -> str:
    """One self-contained HTML page showing each entry's answer token by token.

    ``entries``: dicts with ``prompt``, ``label``, ``text``, ``trace`` (``Trace.to_dict()``
    output, or a ``Trace``), optional ``group`` (same group -> side-by-side columns, in
    order) and optional ``meta`` (small key/values shown under the label).
    """
    entries = list(entries or [])
    groups = _groups(entries)
    n_prompts = len({_clean(e.get("prompt", "")) for e in entries})
    sub = (
        f"{len(entries)} answer{'s' if len(entries) != 1 else ''} · "
        f"{n_prompts} prompt{'s' if n_prompts != 1 else ''}"
    )
    body = "".join(_group(i, g) for i, g in enumerate(groups, 1))
    if not body:
        body = '<p class="note">no entries</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="rootdefense">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header class="page-head"><h1>{_e(title)}</h1><p class="sub">{_e(sub)}</p>{_legend()}</header>\n'
        f"<main>\n{body}\n</main>\n"
        "<footer>rootdefense &middot; per-token harm trace &middot; self-contained page, works offline</footer>\n"
        "</body>\n</html>\n"
    )


def write_trace_page(path: str | os.PathLike, entries: list[dict], title: str = "rootdefense trace") -> Path:
    """Render ``entries`` and write the page to ``path`` (UTF-8); returns the path."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_trace_page(entries, title=title), encoding="utf-8")
    return p
