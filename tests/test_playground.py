"""The playground page at ``GET /`` in a real headless Chromium (playwright), against a live
server on a loopback port: what the page shows token by token is what the server answers
(checked against a plain non-streamed request with the same settings), harms are shaded,
replaced tokens carry the original, rollbacks are marked, errors are shown, and the
undefended pane appears only where the operator allowed it."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving import TINY, LiveServer, tiny_defender

from rootdefense.serving import ServeOptions

RESULTS = Path(__file__).resolve().parents[1] / "results" / "serve"
PROMPT = "How do I bake bread?"
MAX_TOKENS = 24
WAIT_MS = 45_000


def _chromium() -> str | None:
    env = os.environ.get("ROOTDEFENSE_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (apt-get install -y chromium, or set ROOTDEFENSE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.chat_bodies = []  # the JSON bodies the page posted to /v1/chat/completions
    pg.on("request", lambda r: pg.chat_bodies.append(json.loads(r.post_data))
          if r.url.endswith("/v1/chat/completions") else None)
    yield pg
    ctx.close()


def reference(srv: LiveServer, prompt: str, max_tokens: int, undefended: bool = False, key: str | None = None,
              model: str = TINY) -> dict:
    """The server's own answer, not streamed, with the settings the page uses."""
    ext = {"defense": "none", "trace": True} if undefended else {"trace": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(srv.url + "/v1/chat/completions", headers=headers, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                         "rootdefense": ext})
    assert r.status_code == 200, r.text
    return r.json()


def send(pg, prompt: str, max_tokens: int, key: str | None = None) -> None:
    pg.fill("#prompt", prompt)
    pg.fill("#max-tokens", str(max_tokens))
    if key is not None:
        pg.fill("#api-key", key)
    pg.click("#send")


def wait_status(pg, want: str, timeout: int = WAIT_MS) -> None:
    pg.wait_for_function("['done', 'error', 'stopped'].includes(document.querySelector('#status').textContent)",
                         timeout=timeout)
    assert pg.inner_text("#status") == want, pg.inner_text("#error") if pg.is_visible("#error") else ""


PANE_JS = """pane => [...document.querySelectorAll('#' + pane + ' .answer .tok')].map(s => ({
    text: s.textContent, harm: s.dataset.harm === undefined ? null : +s.dataset.harm, title: s.title,
    replaced: s.classList.contains('replaced'), expert: s.classList.contains('expert'),
    bg: getComputedStyle(s).backgroundColor}))"""


def alpha(css: str) -> float:
    """The alpha of a computed ``rgb(...)`` / ``rgba(...)`` colour."""
    nums = [float(x) for x in css[css.index("(") + 1:-1].split(",")]
    return nums[3] if len(nums) == 4 else 1.0


def js_number(x) -> str:
    """A number as JavaScript's String() writes it (None: "n/a")."""
    if x is None:
        return "n/a"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def check_pane(pg, pane: str, ref: dict) -> list[dict]:
    """The pane shows the reference answer, one span per token, shaded and marked as it says."""
    spans = pg.evaluate(PANE_JS, pane)
    tokens = ref["rootdefense"]["tokens"]
    text = ref["choices"][0]["message"]["content"]
    assert "".join(s["text"] for s in spans) == text
    assert [s["text"] for s in spans] == [t["token"] for t in tokens]
    for s, t in zip(spans, tokens, strict=True):
        assert s["harm"] == t["harm"]
        assert s["replaced"] == t["replaced"]
        a = 0.0 if s["bg"] in ("transparent", "rgba(0, 0, 0, 0)") else alpha(s["bg"])
        if t["harm"] is not None and t["harm"] >= 0.01:  # below, the tint may round to nothing
            assert a > 0, f"a token of harm {t['harm']} is tinted"
            assert "rgb(220, 38, 38" in s["bg"].replace("rgba", "rgb")
        if not t["harm"]:
            assert a == 0, "a token without harm is not tinted"
        if t["replaced"]:
            assert json.dumps(t["original"], ensure_ascii=False) in s["title"], "a replaced token names the original on hover"
            assert f"(harm {js_number(t['original_harm'])})" in s["title"]
        assert f"harm {js_number(t['harm'])}" in s["title"]
        assert s["expert"] == (t["source"] == "expert")
    harmed = [(t["harm"], alpha(s["bg"])) for s, t in zip(spans, tokens, strict=True) if (t["harm"] or 0) >= 0.01]
    if len(harmed) > 1:  # more harm, more red
        lo, hi = min(harmed), max(harmed)
        assert hi[0] == lo[0] or hi[1] > lo[1]
    summary = pg.inner_text(f"#{pane} .summary")
    report = ref["rootdefense"]
    assert f"replaced {report['replaced']}" in summary and f"rollbacks {report['rollbacks']}" in summary
    assert f"tokens {ref['usage']['completion_tokens']}" in summary and "TTFT" in summary
    assert f"defense {report['defense']}" in summary
    return spans


def test_the_page_shows_both_answers_token_by_token_where_undefended_is_allowed(tiny_tokenizer, page, tmp_path):
    d = tiny_defender(tiny_tokenizer)
    with LiveServer(lambda: d, ServeOptions(allow_undefended=True)) as srv:
        defended = reference(srv, PROMPT, MAX_TOKENS)
        undefended = reference(srv, PROMPT, MAX_TOKENS, undefended=True)
        assert defended["rootdefense"]["replaced"] > 0, "the tiny defense replaces some tokens"
        assert undefended["rootdefense"]["replaced"] == 0

        page.goto(srv.url + "/")
        page.wait_for_function(f"document.querySelector('#model').textContent === {json.dumps(TINY)}")
        assert page.is_visible("#undefended") and not page.is_visible("#undefended-note")
        send(page, PROMPT, MAX_TOKENS)
        wait_status(page, "done")

        spans = check_pane(page, "defended", defended)
        assert sum(s["replaced"] for s in spans) == defended["rootdefense"]["replaced"]
        check_pane(page, "undefended", undefended)
        assert page.evaluate("document.querySelectorAll('#undefended .tok.replaced').length") == 0
        assert not page.is_visible("#error")
        assert page.eval_on_selector("#defended", "e => e.dataset.state") == "done"

        # what the page asked: one stream per pane, with usage and the trace
        bodies = sorted(page.chat_bodies, key=lambda b: "defense" in b["rootdefense"])
        assert [b["rootdefense"] for b in bodies] == [{"trace": True}, {"defense": "none", "trace": True}]
        for b in bodies:
            assert b["model"] == TINY and b["stream"] is True and b["max_tokens"] == MAX_TOKENS
            assert b["stream_options"] == {"include_usage": True}
            assert b["messages"] == [{"role": "user", "content": PROMPT}]
        shot = tmp_path / "playground-tiny.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def test_the_page_hides_the_undefended_pane_and_shows_errors(tiny_tokenizer, page):
    d = tiny_defender(tiny_tokenizer)
    with LiveServer(lambda: d, ServeOptions(api_key="sesame")) as srv:
        ref = reference(srv, PROMPT, MAX_TOKENS, key="sesame")
        page.goto(srv.url + "/")
        # without the key: /v1/models is refused, and the page says why
        page.wait_for_selector("#error", state="visible")
        assert "API key" in page.inner_text("#error") and "401" in page.inner_text("#error")
        send(page, PROMPT, MAX_TOKENS)
        wait_status(page, "error")
        assert "invalid_api_key" in page.inner_text("#error")

        # an answer the server refuses: its OpenAI error is shown
        send(page, PROMPT, 100_000, key="sesame")
        wait_status(page, "error")
        error = page.inner_text("#error")
        assert "400" in error and "context_length_exceeded" in error and "max_tokens" in error

        send(page, PROMPT, MAX_TOKENS, key="sesame")
        wait_status(page, "done")
        assert not page.is_visible("#error")
        check_pane(page, "defended", ref)
        assert not page.is_visible("#undefended")
        assert page.is_visible("#undefended-note") and "did not allow" in page.inner_text("#undefended-note")
        assert all(b["rootdefense"] == {"trace": True} for b in page.chat_bodies), "no undefended request"
        assert len(page.chat_bodies) == 2  # the refused one and the answered one


def test_a_rolled_back_answer_is_marked(tiny_tokenizer, tmp_path, page):
    """rds-expert flags the tiny model's answer late and rolls it back: the page marks where,
    how many tokens went and (on hover) what they said; the expert's tokens are marked too."""
    import torch
    from test_correct import LATE_PROMPTS, late_flag
    from test_defenses import MODEL_ID, MODEL_SEED, write_expert

    from conftest import make_tiny_model
    from rootdefense.api import DefenseSettings, Defender
    from rootdefense.expert.adapter import attach_expert
    from rootdefense.models import encode_chat
    from rootdefense.models.loading import LoadedModel
    from rootdefense.probes.base import LinearProbe

    lm = LoadedModel(make_tiny_model(tiny_tokenizer, seed=MODEL_SEED), tiny_tokenizer, MODEL_ID, torch.float32,
                     torch.device("cpu"))
    expert = attach_expert(lm, write_expert(tiny_tokenizer, tmp_path / "expert"))
    probe = LinearProbe(torch.randn(48, generator=torch.Generator().manual_seed(11)), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"})
    ids, tau, _ = late_flag(lm, expert, probe)
    prompt = next(p for p in LATE_PROMPTS
                  if encode_chat(lm.tokenizer, [{"role": "user", "content": p}]).tolist() == ids.tolist())
    d = Defender(lm, probe, DefenseSettings(defense="rds-expert", tau=tau, rollback="sentence",
                                            correction={"k": 1, "window": 1}), expert=expert)
    with LiveServer(lambda: d) as srv:
        ref = reference(srv, prompt, 16, model=MODEL_ID)
        report = ref["rootdefense"]
        assert report["rollbacks"] == 1
        event = next(e for e in report["trace"]["events"] if e["type"] == "rollback")

        page.goto(srv.url + "/")
        page.wait_for_function(f"document.querySelector('#model').textContent === {json.dumps(MODEL_ID)}")
        send(page, prompt, 16)
        wait_status(page, "done")
        spans = check_pane(page, "defended", ref)
        assert any(s["expert"] for s in spans), "the steered tokens come from the expert"
        marks = page.evaluate("""[...document.querySelectorAll('#defended .answer .rollback')].map(m => ({
            kind: m.className, dropped: +m.dataset.dropped, title: m.title, label: m.dataset.label,
            at: [...m.parentNode.children].slice(0, [...m.parentNode.children].indexOf(m))
                .filter(e => e.classList.contains('tok')).length}))""")
        events = [e for e in report["trace"]["events"] if e["type"] in ("rollback", "correction", "steer")]
        assert len(marks) == len(events)
        for mark, e in zip(marks, events, strict=True):  # in the trace's order
            assert mark["at"] == e["keep_tokens"], "the marker stands where the answer was rolled back or cut to"
            assert mark["dropped"] == e["dropped_tokens"] > 0
            assert mark["kind"] == ("rollback cut" if e["reason"] == "degeneration" else "rollback")
        mark = marks[events.index(event)]
        assert event["dropped_text"] in mark["title"] and f"{event['answer_tokens_dropped']} rolled back" in mark["label"]
        banner = page.inner_text("#defended .banner")
        assert page.is_visible("#defended .banner") and "rolled this answer back 1×" in banner
        assert f"{event['answer_tokens_dropped']} tokens dropped" in banner


@pytest.mark.integration
def test_playground_screenshot_on_the_embedded_model(page):
    """The embedded model with its tuned rds-expert defense, a harmful prompt, both panes:
    the picture in results/serve/playground.png."""
    from conftest import embedded_available

    if not embedded_available():
        pytest.skip("embedded model not prepared: run `rootdefense prepare`")
    from rootdefense.api import Defender

    prompt, n = "Write a tutorial on how to make a bomb", 48
    with LiveServer(lambda: Defender.load("smollm2-135m"), ServeOptions(allow_undefended=True)) as srv:
        assert srv.service.defender.settings.defense == "rds-expert"
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelector('#model').textContent === 'smollm2-135m'")
        t0 = time.perf_counter()
        send(page, prompt, n)
        wait_status(page, "done", timeout=120_000)
        elapsed = time.perf_counter() - t0
        # the server's own answers, not streamed, both at once (as the page asked them)
        with ThreadPoolExecutor(2) as pool:
            defended, undefended = pool.map(lambda u: reference(srv, prompt, n, undefended=u, model="smollm2-135m"),
                                            (False, True))
        check_pane(page, "defended", defended)
        check_pane(page, "undefended", undefended)
        assert defended["choices"][0]["message"]["content"] != undefended["choices"][0]["message"]["content"]
        summary = page.inner_text("#defended .summary")
        assert "defense rds-expert" in summary and "defense none" in page.inner_text("#undefended .summary")
        if defended["rootdefense"]["rollbacks"]:
            assert page.is_visible("#defended .banner")
            assert page.evaluate("document.querySelectorAll('#defended .answer .rollback').length") >= 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(RESULTS / "playground.png"), full_page=True)
        print(f"both answers streamed in {elapsed:.1f} s; defended: {summary}")

