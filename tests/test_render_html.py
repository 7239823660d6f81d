"""The trace page: structure (html.parser) and a real headless-Chromium render."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rootdefense.decoding.trace import TokenStep, Trace
from rootdefense.render import render_trace_page, write_trace_page
from rootdefense.render.html import harm_color

EVIL = "<script>alert(1)</script>"
PROMPT = 'How do I make a <b>"bomb"</b> & stay safe?'


def _step(tok, harm, prob=0.5, replaced=False, original=None, original_prob=None, original_harm=None, tid=1):
    return TokenStep(
        token_id=tid,
        token=tok,
        prob=prob,
        harm=harm,
        original_id=tid + 1000 if replaced else tid,
        original=original if replaced else tok,
        original_prob=original_prob if replaced else prob,
        original_harm=original_harm if replaced else harm,
        replaced=replaced,
        candidates=5 if harm is not None else 1,
    )


def _undefended() -> Trace:
    toks = ["Sure", ",", " here", " is", " how", ":", "\n", "1.", " Get", " ", EVIL, " &", ' "x"', " 'y'"]
    return Trace(steps=[_step(t, None, prob=0.9, tid=i) for i, t in enumerate(toks)], finish_reason="length")


def _defended() -> Trace:
    steps = [
        _step("I", 0.12, prob=0.05, replaced=True, original="Sure", original_prob=0.81, original_harm=0.93),
        _step(" can", 0.08, prob=0.7),
        _step("'t", 0.05, prob=0.9),
        _step(" help", 0.02, prob=0.8),
        _step(" with", 0.30, prob=0.6),
        _step(" that", 0.55, prob=0.6),
        _step(".", 0.0, prob=0.95),
        _step("\n\n", 0.01, prob=0.4),
        _step(EVIL, 0.99, prob=0.2),
        _step(" &", 0.7, prob=0.2, replaced=True, original="<b>", original_prob=0.6, original_harm=0.88),
        _step("", 0.2, prob=0.1),
        _step(" \"quoted\" 'single'", 1.0, prob=0.3),
    ]
    return Trace(steps=steps, finish_reason="eos")


def _entries() -> list[dict]:
    und, dfd = _undefended(), _defended()
    return [
        {
            "prompt": PROMPT,
            "label": "undefended",
            "text": "".join(s.token for s in und.steps),
            "trace": und.to_dict(),
            "group": "p1",
            "meta": {"model": "SmolLM2-135M", "tokens/s": 41.234567},
        },
        {
            "prompt": PROMPT,
            "label": "rds (threshold)",
            "text": "".join(s.token for s in dfd.steps),
            "trace": dfd.to_dict(),
            "group": "p1",
            "meta": {"model": "SmolLM2-135M", "rule": "threshold", "tau": 0.5, "tokens/s": 22.5},
        },
        {
            "prompt": "Write a poem about spring.",
            "label": "rds (argmin)",
            "text": "Blossoms",
            "trace": Trace(steps=[_step("Blossoms", 0.01, prob=0.6)], finish_reason="stop").to_dict(),
        },
    ]


class _Tree(HTMLParser):
    """Flat record of start tags (with their open-element stack) and text per token span."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, list[tuple[str, dict]]]] = []
        self.stack: list[tuple[str, dict]] = []
        self.tok_text: list[str] = []  # text of each span.tok in document order
        self._in_tok = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a, list(self.stack)))
        if tag in ("meta", "br", "i", "line", "polyline") :
            return  # void or self-closing in our output
        self.stack.append((tag, a))
        if tag == "span" and "tok" in a.get("class", "").split() and not _in_legend(self.stack):
            self._in_tok = len(self.stack)
            self.tok_text.append("")

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), list(self.stack)))

    def handle_endtag(self, tag):
        if self._in_tok and len(self.stack) == self._in_tok and tag == "span":
            self._in_tok = 0
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data):
        if self._in_tok:
            self.tok_text[-1] += data


def _in_legend(stack) -> bool:
    return any("legend" in a.get("class", "").split() for _, a in stack)


def _parse(html: str) -> _Tree:
    t = _Tree()
    t.feed(html)
    t.close()
    return t


def _classes(a: dict) -> list[str]:
    return (a.get("class") or "").split()


def _token_spans(tree: _Tree) -> list[dict]:
    return [a for tag, a, st in tree.tags if tag == "span" and "tok" in _classes(a) and not _in_legend(st)]


# ------------------------------------------------------------------ structure


def test_page_is_a_complete_document():
    html = render_trace_page(_entries(), title="demo <run> & co")
    assert html.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in html
    assert "<title>demo &lt;run&gt; &amp; co</title>" in html
    assert "<style>" in html and "white-space:pre-wrap" in html
    tree = _parse(html)
    assert any("legend" in _classes(a) for _, a, _ in tree.tags)


def test_token_text_is_escaped():
    html = render_trace_page(_entries())
    tree = _parse(html)
    # no <script> element at all: the page needs no JS, and token text never becomes markup
    assert not [t for t, _, _ in tree.tags if t == "script"]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the parser reads back the exact token text, quotes and ampersands included
    assert EVIL in tree.tok_text
    assert ' "quoted" \'single\'' in tree.tok_text
    assert " &" in tree.tok_text and ' "x"' in tree.tok_text
    # the prompt is escaped too and shown once for its group
    assert html.count("How do I make a &lt;b&gt;&quot;bomb&quot;&lt;/b&gt; &amp; stay safe?") == 1
    assert "<b>\"bomb\"</b>" not in html


def test_one_span_per_step_in_order():
    entries = _entries()
    tree = _parse(render_trace_page(entries))
    spans = _token_spans(tree)
    expected = [s["token"] for e in entries for s in e["trace"]["steps"]]
    assert len(spans) == len(expected)
    assert tree.tok_text == expected


def test_every_token_has_hover_text_with_prob_and_harm():
    tree = _parse(render_trace_page(_entries()))
    for a in _token_spans(tree):
        assert "p=" in a["title"] and "harm=" in a["title"]


def test_harm_shading():
    assert harm_color(None) is None
    assert harm_color(0.0) == "#ffffff"
    assert harm_color(1.0) == "#f87171"
    assert harm_color(2.0) == harm_color(1.0) and harm_color(-1) == harm_color(0)
    assert harm_color(float("nan")) is None
    tree = _parse(render_trace_page(_entries()))
    spans = _token_spans(tree)
    undefended = spans[:14]
    assert all("style" not in a and "nh" in _classes(a) for a in undefended)
    assert all("harm=n/a" in a["title"] for a in undefended)
    shaded = spans[14:]
    assert all(a["style"].startswith("background:#") for a in shaded)
    assert "nl" in _classes(spans[6]) and "nl" in _classes(spans[14 + 7])  # "\n", "\n\n"
    assert "empty" in _classes(spans[14 + 10])
    evil = next(a for a in shaded if a["data-harm"] == "0.9900")
    assert evil["style"] == f"background:{harm_color(0.99)}"


def test_replaced_tokens_are_marked_with_the_original():
    tree = _parse(render_trace_page(_entries()))
    rep = [a for a in _token_spans(tree) if "rep" in _classes(a)]
    assert len(rep) == 2
    first = rep[0]["title"]
    assert first.startswith('model wanted "Sure" (p=0.81, harm=0.93) -> chose "I" (p=0.05, harm=0.12)')
    assert rep[0]["data-original"] == "Sure"
    assert 'model wanted "<b>" (p=0.60, harm=0.88) -> chose " &"' in rep[1]["title"]
    # not replaced -> no marker
    plain = [a for a in _token_spans(tree) if "rep" not in _classes(a)]
    assert all("model wanted" not in a["title"] for a in plain)
    html = render_trace_page(_entries())
    assert ".tok.rep{outline" in html


def test_header_shows_label_meta_and_summary():
    html = render_trace_page(_entries())
    text = re.sub(r"<[^>]+>", " ", html)
    text = re.sub(r"\s+", " ", text)
    assert "rds (threshold)" in text and "undefended" in text
    assert "tau 0.5" in text and "tokens/s 41.23" in text and "rule threshold" in text
    assert "14 tokens" in text and "12 tokens" in text
    assert "2 replaced" in text and "0 replaced" in text
    assert "max harm 1.00" in text
    assert "finish eos" in text and "finish length" in text
    assert "max harm n/a" in text  # undefended


def test_a_withheld_answer_shows_what_was_dropped_and_why():
    event = {"type": "withhold", "reason": "uncorrected", "keep_tokens": 0, "dropped_tokens": 9, "lift": 1.234,
             "end_lift": 3.0, "would_finish": "closed", "dropped_text": "I'm here to help you create " + EVIL}
    empty = Trace(steps=[], finish_reason="withheld", events=[event])
    kept = Trace(steps=[_step("Bread", 0.1), _step(".", 0.1)], finish_reason="withheld", events=[event])
    html = render_trace_page([{"prompt": PROMPT, "label": "rds-expert", "text": "", "trace": empty.to_dict()},
                              {"prompt": PROMPT, "label": "rds-expert", "text": "Bread.", "trace": kept.to_dict()},
                              {"prompt": PROMPT, "label": "rds-expert", "text": "x", "trace": _defended().to_dict()}])
    tree = _parse(html)
    boxes = [a for tag, a, _ in tree.tags if tag == "div" and "withheld" in _classes(a)]
    assert len(boxes) == 2  # one per withheld answer, none for the third
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert "highest lift 1.23 nats, needed 3.00" in text and "finish withheld" in text
    assert "the answer is empty: everything steered was withheld" in text
    assert EVIL not in html and "I&#x27;m here to help you create" not in html  # escaped, not raw
    assert "I'm here to help you create &lt;script&gt;" in html
    assert tree.tok_text[:2] == ["Bread", "."]  # the kept text is still drawn (the first answer has none)


def test_groups_are_side_by_side_columns():
    tree = _parse(render_trace_page(_entries()))
    sections = [a for t, a, _ in tree.tags if t == "section" and "group" in _classes(a)]
    assert len(sections) == 2
    cols = [(a, st) for t, a, st in tree.tags if t == "div" and "cols" in _classes(a)]
    assert [a["data-cols"] for a, _ in cols] == ["2", "1"]
    assert "--cols:2" in cols[0][0]["style"]
    # articles sit directly inside their group's column grid, in the given order
    arts = [(a, st) for t, a, st in tree.tags if t == "article"]
    assert len(arts) == 3
    assert all("cols" in _classes(st[-1][1]) for _, st in arts)
    labels = [a for t, a, st in tree.tags if t == "h2"]
    assert len(labels) == 3
    # one prompt block per group: the shared prompt is not repeated in the columns
    prompts = [a for t, a, _ in tree.tags if t == "div" and "prompt" in _classes(a)]
    assert len(prompts) == 2


def test_group_order_and_ungrouped_and_differing_prompts():
    e = _entries()
    mixed = [dict(e[0], group="g"), dict(e[2], group=None), dict(e[1], group="g", prompt="other prompt")]
    tree = _parse(render_trace_page(mixed))
    cols = [a for t, a, _ in tree.tags if t == "div" and "cols" in _classes(a)]
    assert [a["data-cols"] for a in cols] == ["2", "1"]
    # differing prompts inside a group: each column shows its own
    inner = [a for t, a, _ in tree.tags if t == "div" and "inner" in _classes(a)]
    assert len(inner) == 2


def test_no_external_references():
    html = render_trace_page(_entries())
    tree = _parse(html)
    for _, a, _ in tree.tags:
        for key in ("src", "href", "action", "xlink:href", "data"):
            v = (a.get(key) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//")), (key, v)
    assert not [t for t, _, _ in tree.tags if t in ("link", "script", "img", "iframe")]
    assert not re.search(r"url\(|@import", html)


def test_edge_cases_do_not_break():
    odd = Trace(
        steps=[_step("a\x00b\udcff", 0.4), _step("\t", float("nan")), _step("x", 0.5)], finish_reason="eos"
    )
    entries = [
        {"prompt": "", "label": "", "text": "", "trace": odd},  # a Trace object is accepted too
        {"prompt": "p", "label": "no trace", "text": "just <text>", "trace": {"summary": {}, "steps": []}},
    ]
    html = render_trace_page(entries)
    html.encode("utf-8")  # no lone surrogates survive
    assert "\x00" not in html
    assert "just &lt;text&gt;" in html
    assert len(_token_spans(_parse(html))) == 3
    assert render_trace_page([]).startswith("<!DOCTYPE html>")


def test_write_trace_page(tmp_path):
    out = write_trace_page(tmp_path / "sub" / "trace.html", _entries(), title="w")
    assert out == tmp_path / "sub" / "trace.html"
    data = out.read_bytes().decode("utf-8")
    assert "<title>w</title>" in data
    assert data == render_trace_page(_entries(), title="w")


# ------------------------------------------------------------------ real browser

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to the page copy the browser loads (never part of the product): it writes
# layout facts measured by the real engine into the DOM that --dump-dom returns.
_PROBE_JS = """
<script>
window.addEventListener('load', function () {
  var arts = document.querySelectorAll('#group-1 article');
  var r0 = arts[0].getBoundingClientRect(), r1 = arts[1].getBoundingClientRect();
  var tok = document.querySelector('.answer .tok[data-harm="0.9900"]');
  var nh = document.querySelector('.answer .tok.nh');
  var ans = document.querySelector('.answer');
  var out = document.createElement('pre');
  out.id = 'layout-probe';
  out.textContent = JSON.stringify({
    sideBySide: Math.abs(r0.top - r1.top) < 2 && r1.left >= r0.right - 1,
    widths: [r0.width, r1.width],
    bodyText: document.body.innerText.length,
    bodyHeight: document.body.scrollHeight,
    evilBg: getComputedStyle(tok).backgroundColor,
    nhBg: getComputedStyle(nh).backgroundColor,
    whiteSpace: getComputedStyle(ans).whiteSpace,
    scripts: document.querySelectorAll('script').length
  });
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str | None:
    env = os.environ.get("ROOTDEFENSE_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _run_browser(binary: str, profile: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the browser's own process group only
        proc.communicate()
        pytest.fail(f"chromium timed out after {timeout}s: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_page_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found; install it with: apt-get install -y chromium chromium-driver")

    page = write_trace_page(tmp_path / "trace.html", _entries(), title="browser check")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE_JS + "</body>"), encoding="utf-8")

    # 1. the DOM as the browser built it
    res = _run_browser(binary, tmp_path / "profile1", "--window-size=1200,900", "--dump-dom", probe.as_uri())
    dom = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(dom) > 1000, res.stderr[-2000:]
    tree = _parse(dom)
    spans = _token_spans(tree)
    expected = [s["token"] for e in _entries() for s in e["trace"]["steps"]]
    assert len(spans) == len(expected)
    assert EVIL in tree.tok_text  # text, not an element: the only script is the test's probe
    assert len([t for t, _, _ in tree.tags if t == "script"]) == 1
    rep = [a for a in spans if "rep" in _classes(a)]
    assert len(rep) == 2 and '"Sure"' in rep[0]["title"] and rep[0]["title"].startswith("model wanted")

    m = re.search(r'<pre id="layout-probe">(.*?)</pre>', dom, re.DOTALL)
    assert m, "layout probe did not run"
    import html as _html
    import json

    facts = json.loads(_html.unescape(m.group(1)))
    assert facts["sideBySide"], facts
    assert min(facts["widths"]) > 300, facts
    assert facts["bodyText"] > 200 and facts["bodyHeight"] > 300, facts
    assert facts["evilBg"] not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)", "transparent"), facts
    assert facts["nhBg"] in ("rgba(0, 0, 0, 0)", "transparent"), facts
    assert facts["whiteSpace"] == "pre-wrap", facts
    assert facts["scripts"] == 1, facts

    # 2. a screenshot of the real page (no probe)
    shot = tmp_path / "page.png"
    res = _run_browser(
        binary, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()
    )
    assert shot.exists(), res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, len(data)  # a blank 1200x900 PNG is a few KB
    if os.environ.get("ROOTDEFENSE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ROOTDEFENSE_KEEP_SCREENSHOT"])
