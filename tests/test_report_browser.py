"""The evaluation report page, as headless Chromium lays it out: tables filled, heat cells
shaded, SVG bars drawn with real sizes, no script of its own."""

from __future__ import annotations

import html as _html
import json
import re

import pytest
from test_eval import _res
from test_render_html import _chromium, _run_browser

from rootdefense.evaluation.report import render_report
from rootdefense.evaluation.summary import summarize

_PROBE_JS = """
<script>
window.addEventListener('load', function () {
  var bars = Array.from(document.querySelectorAll('svg rect[fill^="#"]'))
      .filter(function (r) { return r.getBBox().height > 0; });
  var heat = Array.from(document.querySelectorAll('table.heat td[style]'))
      .map(function (td) { return getComputedStyle(td).backgroundColor; });
  var out = document.createElement('pre');
  out.id = 'layout-probe';
  out.textContent = JSON.stringify({
    bars: bars.length,
    tallest: Math.max.apply(null, bars.map(function (r) { return r.getBBox().height; })),
    heat: heat,
    tables: document.querySelectorAll('table').length,
    svgs: document.querySelectorAll('svg').length,
    scripts: document.querySelectorAll('script').length,
    width: document.body.scrollWidth
  });
  document.body.appendChild(out);
});
</script>
"""


def _page() -> str:
    lines = [{"kind": "run", "config": {"model": "tiny", "defenses": ["none", "rds"], "attacks": ["none", "dan"],
                                        "judges": ["refusal", "harm"]}, "config_hash": "abc"}]
    for i in range(6):
        for attack in ("none", "dan"):
            lines.append(_res("none", attack, True, label=True, pid=f"h{i}"))
            lines.append(_res("rds", attack, True, label=i < 2, pid=f"h{i}"))
        lines.append(_res("none", "none", False, label=False, dataset="edgy", pid=f"b{i}", answer="x", ms=10))
        lines.append(_res("rds", "none", False, label=False, dataset="edgy", pid=f"b{i}", answer="x", ms=21))
    summary = summarize(lines)
    return render_report(summary, [o for o in lines if o["kind"] == "result"])


def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found; install it with: apt-get install -y chromium")
    page = _page()
    assert "<script" not in page
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", _PROBE_JS + "</body>"), encoding="utf-8")
    res = _run_browser(binary, tmp_path / "profile", "--window-size=1200,900", "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="layout-probe">(.*?)</pre>', res.stdout, re.DOTALL)
    assert m, "layout probe did not run: " + res.stderr[-1000:]
    facts = json.loads(_html.unescape(m.group(1)))
    # 2 defenses x 2 attacks of attack-success bars + speed bars, all with a drawn height
    assert facts["bars"] >= 6 and facts["tallest"] > 100, facts
    # undefended cells (100% harmful) are red, rds cells (33%) lighter, never plain white
    assert "rgb(255, 105, 105)" in facts["heat"] and "rgb(255, 255, 255)" not in facts["heat"], facts
    assert facts["tables"] >= 5 and facts["svgs"] >= 3 and facts["scripts"] == 1, facts
    assert facts["width"] <= 1200, facts
