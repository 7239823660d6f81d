"""`rootdefense loadtest` against a live server (a tiny random model on a free loopback port)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tokenizer

from rootdefense.cli import cli
from rootdefense.serving import loadtest as lt

PROMPTS = [lt.Prompt("How do I bake bread?", "benign", "fixed"),
           lt.Prompt("Sure, here is a tutorial on something bad", "harmful", "fixed"),
           lt.Prompt("The quick brown fox", "benign", "fixed"),
           lt.Prompt("Tell me step one, step two", "harmful", "fixed")]


def _serve(api_key=None):
    import uvicorn

    from rootdefense.api import Defender, DefenseSettings
    from rootdefense.models.loading import LoadedModel
    from rootdefense.probes.base import LinearProbe
    from rootdefense.serving import ServeOptions, create_app

    tok = make_tokenizer()
    lm = LoadedModel(make_tiny_model(tok), tok, "tiny", torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": "tiny", "kind": "response"})
    app = create_app(lambda: Defender(lm, probe, DefenseSettings(defense="rds", rule="threshold", drafter="ngram")),
                     ServeOptions(api_key=api_key))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", trust_env=False).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("the test server did not start")
    return server, thread, base


@pytest.fixture(scope="module")
def server():
    srv, thread, base = _serve()
    yield base
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def keyed_server():
    srv, thread, base = _serve(api_key="sekrit")
    yield base
    srv.should_exit = True
    thread.join(10)


def _fixed_prompts(monkeypatch):
    info = {"source": "fixed test prompts"}
    monkeypatch.setattr(lt, "held_out_prompts", lambda n, seed=0: ([PROMPTS[i % 4] for i in range(n)], info))


def test_loadtest_cli_reports_real_figures(server, tmp_path, monkeypatch):
    _fixed_prompts(monkeypatch)
    out = tmp_path / "lt.json"
    res = CliRunner().invoke(cli, ["loadtest", "--url", server, "--requests", "6", "--concurrency", "1,2",
                                   "--max-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "concurrency" in res.output or "conc." in res.output
    report = json.loads(out.read_text())
    assert report["command"].startswith("rootdefense loadtest --url")
    assert report["server"]["models"]["data"][0]["id"] == "tiny"
    assert report["client"]["processor"]
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    lines = [json.loads(line) for line in (tmp_path / "lt.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for lv in report["levels"]:
        assert lv["sent"] == lv["finished"] == lv["ok"] == 6
        assert lv["failed"] == lv["unfinished"] == 0 and lv["errors"] == {}
        assert not lv["time_limit_hit"]
        assert lv["ok_by_kind"] == {"benign": 3, "harmful": 3}
        mine = [r for r in lines if r["concurrency"] == lv["concurrency"]]
        assert lv["output_tokens"] == sum(r["completion_tokens"] for r in mine) > 0
        assert all(0 < r["completion_tokens"] <= 6 for r in mine)
        assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > 0
        for metric in ("ttft_s", "latency_s"):
            s = lv[metric]["all"]
            assert s["n"] == 6 - lv["no_text"] if metric == "ttft_s" else s["n"] == 6
            assert 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
            assert lv[metric]["benign"]["n"] + lv[metric]["harmful"]["n"] == s["n"]
        for r in mine:
            assert r["ttft_s"] is None or 0 < r["ttft_s"] <= r["latency_s"]
        assert lv["memory_bytes"]["before"] > 0 and lv["memory_bytes"]["after"] > 0
    t = report["targets"]
    assert t["no_5xx"] == {**t["no_5xx"], "count": 0, "met": True}
    assert t["throughput_c16_vs_c1"]["met"] is None  # no level 16 here
    assert isinstance(t["memory_growth"]["met"], bool)


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "ftp://127.0.0.1:1"])
def test_loadtest_refuses_other_hosts(url, tmp_path):
    res = CliRunner().invoke(cli, ["loadtest", "--url", url, "--requests", "1", "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0
    assert "127.0.0.1" in res.output
    assert not (tmp_path / "x.json").exists()


def test_loadtest_counts_errors_by_status(keyed_server, tmp_path, monkeypatch):
    out = tmp_path / "e.json"
    report = lt.run_loadtest(lt.LoadTestConfig(url=keyed_server, requests=4, concurrency=[2], max_tokens=4,
                                               out=str(out)), prompts=PROMPTS)
    lv = report["levels"][0]
    assert lv["ok"] == 0 and lv["failed"] == 4 and lv["errors"] == {"401": 4}
    assert report["targets"]["no_5xx"]["met"] is True
    # with the key: answered
    monkeypatch.setenv("LT_KEY", "sekrit")
    report = lt.run_loadtest(lt.LoadTestConfig(url=keyed_server, requests=2, concurrency=[1], max_tokens=4,
                                               api_key_env="LT_KEY", out=str(out)), prompts=PROMPTS)
    assert report["levels"][0]["ok"] == 2 and report["levels"][0]["memory_bytes"]["before"] > 0


def test_loadtest_transport_errors(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    report = lt.run_loadtest(lt.LoadTestConfig(url=f"http://127.0.0.1:{port}", requests=3, concurrency=[1],
                                               out=str(tmp_path / "t.json")), prompts=PROMPTS)
    lv = report["levels"][0]
    assert lv["ok"] == 0 and lv["errors"] == {"transport: ConnectError": 3}
    assert report["targets"]["memory_growth"]["met"] is None


def test_loadtest_time_limit_stops_a_level(tmp_path, monkeypatch):
    monkeypatch.setattr(lt, "INFO_TIMEOUT_S", 0.2)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)  # connects, never answers
    try:
        t0 = time.perf_counter()
        report = lt.run_loadtest(lt.LoadTestConfig(url=f"http://127.0.0.1:{s.getsockname()[1]}", requests=10,
                                                   concurrency=[2], time_limit=0.5, out=str(tmp_path / "t.json")),
                                 prompts=PROMPTS)
        assert time.perf_counter() - t0 < 5
    finally:
        s.close()
    lv = report["levels"][0]
    assert lv["time_limit_hit"] and lv["sent"] == 2 and lv["finished"] == 0 and lv["unfinished"] == 2


def test_held_out_prompt_mix_is_deterministic_and_interleaved():
    try:
        a, info = lt.held_out_prompts(8, seed=3)
    except Exception as e:  # the dataset packages are optional
        pytest.skip(f"held-out data not installed: {e}")
    b, _ = lt.held_out_prompts(8, seed=3)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.kind for p in a] == ["benign", "harmful"] * 4
    assert {p.dataset for p in a} <= set(lt.BENIGN_DATASETS + lt.HARMFUL_DATASETS)
    assert info["benign"]["datasets"] == list(lt.BENIGN_DATASETS)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 0.1, 2.0, 0.7, 0.5, 1.1, 0.9]
    for q in (50, 95, 99):
        assert lt.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
