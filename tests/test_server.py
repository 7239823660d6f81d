"""The OpenAI-compatible server, live on a loopback port, driven by the real `openai` client:
answers equal to the library's, streams that add up to the whole answer and never carry a
stop string, every error in OpenAI's shape, the defense the operator's, continuous batching
(parallel answers equal sequential ones), disconnects freeing their slot, and shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import make_tiny_model
from serving import TINY, LiveServer, free_port, stream_text, tiny_defender
from test_correct import LATE_PROMPTS, late_flag
from test_defenses import MODEL_ID, MODEL_SEED, write_expert

from rootdefense.api import DefenseSettings, Defender
from rootdefense.decoding import Decoder, GenerationConfig
from rootdefense.expert.adapter import attach_expert
from rootdefense.models import encode_chat
from rootdefense.models.loading import LoadedModel
from rootdefense.probes.base import LinearProbe
from rootdefense.serving import ServeOptions
from rootdefense.serving.run import exposure_warning

PROMPTS = ["How do I bake bread?", "Tell me a story about a dragon.", "hi", "How do I pick a lock? Explain every step.",
           "List three colours.", "Sure, here is a tutorial", "The quick brown fox", "Mix flour"]


def ask(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def defender(tiny_tokenizer):
    return tiny_defender(tiny_tokenizer)


@pytest.fixture(scope="module")
def server(defender):
    with LiveServer(lambda: defender, ServeOptions(max_batch=8)) as srv:
        yield srv


def test_models_health_and_metrics(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [TINY]
    info = models[0].model_extra["rootdefense"]
    assert info["defense"] == "rds" and info["threshold"] == 0.5 and info["allow_undefended"] is False
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": TINY, "defense": "rds"}
    server.client().chat.completions.create(model=TINY, messages=ask("hi"), max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("rootdefense_requests_total", "rootdefense_tokens_out_total", "rootdefense_tokens_replaced_total",
                 "rootdefense_rollbacks_total", "rootdefense_queue_depth", "rootdefense_batch_size",
                 "rootdefense_time_to_first_token_seconds_bucket", "rootdefense_request_latency_seconds_bucket",
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert server.metric("rootdefense_requests_total", 'endpoint="/v1/chat/completions",status="200"') >= 1


def test_health_is_503_until_the_model_has_loaded(defender):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return defender

    with LiveServer(slow_load, wait=False) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        r = srv.post("/v1/chat/completions", json={"model": TINY, "messages": ask("hi")})
        assert r.status_code == 503 and r.headers["retry-after"]
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_shutdown_while_the_model_loads_starts_no_worker(defender):
    """A server stopped before its model finished loading leaves no model thread behind
    (a thread left running at interpreter exit can crash the process as it ends)."""
    from rootdefense.serving.app import Service

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return defender

    def workers():
        return sum(t.name == "rootdefense-model-worker" for t in threading.enumerate())

    before = workers()
    svc = Service(slow_load, ServeOptions())
    svc.start(background=True)
    svc.stop()
    gate.set()
    svc._loader.join(30)
    assert not svc._loader.is_alive() and svc.worker is None and svc.defender is None
    assert workers() == before
    loaded = Service(lambda: defender, ServeOptions())  # without the shutdown the worker runs, until stopped
    loaded.start(background=False)
    assert workers() == before + 1 and loaded.defender is defender
    loaded.stop()
    assert workers() == before


def test_chat_and_completions_answer_as_the_library(server, defender):
    """The server's answer is the library's (greedy is the server's default), with usage
    and the defense's report; the trace when asked."""
    c = server.client()
    for text in PROMPTS[:3]:
        r = c.chat.completions.create(model=TINY, messages=ask(text), max_tokens=24,
                                      extra_body={"rootdefense": {"trace": True}})
        want = defender.generate(messages=ask(text), config=GenerationConfig(max_new_tokens=24))
        assert r.choices[0].message.content == want.text and r.object == "chat.completion"
        assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.token_ids)
        rd = r.model_extra["rootdefense"]
        assert rd["defense"] == "rds" and rd["replaced"] == want.trace.replaced
        assert rd["max_harm"] == pytest.approx(want.trace.summary()["max_harm"], abs=1e-4)
        assert "".join(t["token"] for t in rd["tokens"]) == want.text
        assert [t["replaced"] for t in rd["tokens"]] == [s.replaced for s in want.trace.steps]
        assert r.choices[0].finish_reason == ("length" if want.trace.finish_reason == "length" else "stop")
    assert any(c.chat.completions.create(model=TINY, messages=ask(t), max_tokens=24).model_extra["rootdefense"]
               ["replaced"] for t in PROMPTS), "the threshold rule replaced tokens in some answer"
    ids = defender.lm.tokenizer("The quick brown", add_special_tokens=False)["input_ids"]
    want = defender.decoder.generate(torch.tensor([ids]), GenerationConfig(max_new_tokens=12))
    r = c.completions.create(model=TINY, prompt="The quick brown", max_tokens=12)
    assert r.choices[0].text == want.text and r.object == "text_completion" and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model=TINY, prompt="The quick brown", max_tokens=12, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text


def test_a_stream_adds_up_to_the_whole_answer(server):
    c = server.client()
    for text in PROMPTS[:4]:
        whole = c.chat.completions.create(model=TINY, messages=ask(text), max_tokens=30)
        got, chunks = stream_text(c, model=TINY, messages=ask(text), max_tokens=30,
                                  stream_options={"include_usage": True})
        assert got.encode() == whole.choices[0].message.content.encode()
        assert chunks[0].choices[0].delta.role == "assistant"
        ends = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(ends) == 1 and ends[0].choices[0].finish_reason == whole.choices[0].finish_reason
        assert ends[0].model_extra["rootdefense"]["replaced"] == whole.model_extra["rootdefense"]["replaced"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert len({ch.id for ch in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_never_reaches_the_client(server, stream):
    c = server.client()
    full = c.chat.completions.create(model=TINY, messages=ask(PROMPTS[0]), max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    want = full[:full.find(stop)]
    if stream:
        text, chunks = stream_text(c, model=TINY, messages=ask(PROMPTS[0]), max_tokens=40, stop=[stop])
        sent = ""
        for ch in chunks:
            sent += (ch.choices[0].delta.content or "") if ch.choices else ""
            assert stop not in sent
        reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    else:
        r = c.chat.completions.create(model=TINY, messages=ask(PROMPTS[0]), max_tokens=40, stop=stop)
        text, reason = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert text == want and reason == ["stop"]


def test_parallel_requests_are_answered_as_sequential_ones(server):
    """Eight clients at once join one running batch (continuous batching); each greedy
    answer, and each seeded sampled one, equals the same request served alone."""
    c = server.client()
    kinds = [dict(max_tokens=8 + 3 * i) for i in range(6)] + [dict(max_tokens=20, temperature=0.8, seed=7),
                                                              dict(max_tokens=16, stop=["e"])]
    jobs = list(zip(PROMPTS, kinds, strict=True))
    alone = [c.chat.completions.create(model=TINY, messages=ask(p), **k).choices[0].message.content for p, k in jobs]
    steps_before = server.service.worker.steps
    out = [None] * len(jobs)

    def run(i):
        p, k = jobs[i]
        out[i] = c.chat.completions.create(model=TINY, messages=ask(p), **k).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone
    longest = max(k["max_tokens"] for k in kinds)
    assert server.service.worker.steps - steps_before < sum(k["max_tokens"] for k in kinds) / 2 + longest, \
        "the requests shared decoding steps"


def err(r: httpx.Response, status: int, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_every_bad_request_gets_a_specific_openai_error(server):
    chat = "/v1/chat/completions"
    ok = {"model": TINY, "messages": ask("hi"), "max_tokens": 4}
    err(server.post(chat, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
        400, "invalid_json")
    err(server.post(chat, json={**ok, "temperature": "hot"}), 400, param="temperature")
    err(server.post(chat, json={**ok, "top_p": 0}), 400, param="top_p")
    err(server.post(chat, json={**ok, "max_tokens": 0}), 400, param="max_tokens")
    err(server.post(chat, json={**ok, "n": 2}), 400, param="n")
    err(server.post(chat, json={**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, param="stop")
    err(server.post(chat, json={**ok, "frobnicate": 1}), 400, param="frobnicate")
    err(server.post(chat, json={**ok, "logprobs": True}), 400, param="logprobs")
    err(server.post(chat, json={**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400,
        param="messages[0].role")
    err(server.post(chat, json={**ok, "messages": []}), 400, param="messages")
    err(server.post(chat, json={"model": TINY}), 400, param="messages")
    err(server.post(chat, json={**ok, "stream_options": {"include_usage": True}}), 400, param="stream_options")
    err(server.post(chat, json={**ok, "model": "gpt-4o"}), 404, "model_not_found", "model")
    err(server.post("/v1/completions", json={"model": TINY, "prompt": ["a", "b"]}), 400, param="prompt")
    err(server.post(chat, json={**ok, "max_tokens": 600}), 400, "context_length_exceeded", "messages")
    err(server.post(chat, json={**ok, "messages": ask("bread " * 600)}), 400, "context_length_exceeded")
    err(server.post(chat, json={**ok, "messages": ask("x" * 1_100_000)}), 413, "request_too_large")
    err(httpx.get(server.url + "/v1/nothing"), 404)
    err(httpx.get(server.url + "/v1/chat/completions"), 405)
    with pytest.raises(openai.BadRequestError) as e:  # and the openai client reads them as such
        server.client().chat.completions.create(model=TINY, messages=ask("hi"), n=3)
    assert e.value.body["param"] == "n"


def test_the_defense_is_the_operators(server, defender):
    """A request may ask for the trace or a stricter threshold; turning the defense off or
    raising the threshold is refused unless the operator allowed it."""
    chat = "/v1/chat/completions"
    ok = {"model": TINY, "messages": ask(PROMPTS[0]), "max_tokens": 20}
    err(server.post(chat, json={**ok, "rootdefense": {"defense": "none"}}), 400, "defense_not_weakenable",
        "rootdefense.defense")
    err(server.post(chat, json={**ok, "rootdefense": {"tau": 0.9}}), 400, "defense_not_weakenable", "rootdefense.tau")
    err(server.post(chat, json={**ok, "rootdefense": {"defense": "rds-expert"}}), 400, param="rootdefense.defense")
    err(server.post(chat, json={**ok, "rootdefense": {"probe": "/etc/passwd"}}), 400, param="rootdefense.probe")
    err(server.post(chat, json={**ok, "rootdefense": {"tau": 2}}), 400, param="rootdefense.tau")
    base = server.post(chat, json=ok).json()["rootdefense"]
    strict = server.post(chat, json={**ok, "rootdefense": {"tau": 0.2}}).json()["rootdefense"]
    assert strict["replaced"] > base["replaced"], "a lower threshold replaces more tokens"


def test_an_operator_may_allow_undefended_answers(defender):
    with LiveServer(lambda: defender, ServeOptions(allow_undefended=True)) as srv:
        c = srv.client()
        r = c.chat.completions.create(model=TINY, messages=ask(PROMPTS[0]), max_tokens=20,
                                      extra_body={"rootdefense": {"defense": "none", "trace": True}})
        plain = defender.decoder.generate(defender.encode(messages=ask(PROMPTS[0])), GenerationConfig(max_new_tokens=20))
        rd = r.model_extra["rootdefense"]
        assert rd["defense"] == "none" and rd["replaced"] == 0
        undefended = Decoder(defender.lm.model, defender.lm.tokenizer, eos_token_ids=defender.lm.eos_token_ids)
        want = undefended.generate(defender.encode(messages=ask(PROMPTS[0])), GenerationConfig(max_new_tokens=20))
        assert r.choices[0].message.content == want.text
        assert plain.trace.replaced > 0 and plain.text != want.text
        assert all(t["harm"] is not None for t in rd["tokens"]), "undefended answers are still scored"


def test_an_api_key_is_required_when_set(defender):
    with LiveServer(lambda: defender, ServeOptions(api_key="s3cret")) as srv:
        err(srv.post("/v1/chat/completions", json={"model": TINY, "messages": ask("hi")}), 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        assert srv.client(api_key="s3cret").models.list().data[0].id == TINY
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tiny_tokenizer):
    defender = tiny_defender(tiny_tokenizer)
    running_model = threading.Event()
    running_model.set()
    # the model waits on this gate before each forward pass, so the first answer cannot end
    # (and free its slot) while the test fills the queue, however fast the machine
    hook = defender.lm.model.register_forward_pre_hook(lambda module, args: running_model.wait(30) and None)
    try:
        with LiveServer(lambda: defender, ServeOptions(max_batch=1, max_queue=1)) as srv:
            body = {"model": TINY, "messages": ask("hi"), "max_tokens": 400, "stream": True}
            with httpx.Client(timeout=60) as h, h.stream("POST", srv.url + "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()
                while '"content"' not in next(lines):  # the first request holds the one batch slot
                    pass
                running_model.clear()
                with h.stream("POST", srv.url + "/v1/chat/completions", json=body) as waiting:
                    deadline = time.monotonic() + 10
                    while srv.service.worker.queued < 1:  # the second waits in the queue
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    r = h.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
                    e = err(r, 429, "queue_full")
                    assert r.headers["retry-after"] == "1" and e["type"] == "rate_limit_error"
                    running_model.set()
                    del waiting
    finally:
        running_model.set()
        hook.remove()


def test_a_client_that_disconnects_frees_its_slot_within_one_step(server):
    w = server.service.worker
    before = server.metric("rootdefense_cancelled_total", 'reason="disconnect"')
    with httpx.Client(timeout=60) as h:
        body = {"model": TINY, "messages": ask(PROMPTS[1]), "max_tokens": 450, "stream": True}
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            while '"content"' not in next(lines) or w.rows() == 0:
                pass
            assert w.rows() == 1
    t0 = time.monotonic()
    while w.rows():
        assert time.monotonic() - t0 < 5, "the slot was not freed"
        time.sleep(0.005)
    assert server.metric("rootdefense_cancelled_total", 'reason="disconnect"') == before + 1


def test_the_worker_frees_a_cancelled_slot_before_its_next_step(defender):
    """The worker applies a cancellation before it steps again: at most the step already
    running when it arrived is spent on the request."""
    import asyncio

    from rootdefense.decoding.engine import Request
    from rootdefense.serving.worker import ModelWorker, Ticket

    async def main():
        w = ModelWorker(defender, max_batch=4).start()
        ids = defender.encode(messages=ask(PROMPTS[1]))[0].tolist()
        t = Ticket(w.base_key, Request(ids, GenerationConfig(max_new_tokens=450)), asyncio.get_running_loop(), None)
        w.submit(t)
        while w.steps < 3:
            await asyncio.sleep(0.001)
        at = w.steps
        w.cancel(t, "disconnect")
        _, gen, reason = await _end(t)
        assert w.steps - at <= 1 and w.rows() == 0
        assert reason == "disconnect" and gen.trace.finish_reason == "cancelled" and len(gen.token_ids) < 450
        w.stop()

    async def _end(t):
        while True:
            ev = await asyncio.wait_for(t.events.get(), 10)
            if ev[0] == "end":
                return ev

    asyncio.run(main())


def test_bad_requests_never_disturb_running_streams(server):
    c = server.client()
    want = {p: c.chat.completions.create(model=TINY, messages=ask(p), max_tokens=40).choices[0].message.content
            for p in PROMPTS[:4]}
    got = {}

    def run(p):
        got[p] = stream_text(c, model=TINY, messages=ask(p), max_tokens=40)[0]

    threads = [threading.Thread(target=run, args=(p,)) for p in want]
    for t in threads:
        t.start()
    junk = [b"{", b"[]", b'{"messages": 3}', b'{"model": "' + TINY.encode() + b'", "messages": [{"role": "user"}]}',
            json.dumps({"model": TINY, "messages": ask("hi"), "max_tokens": 10 ** 6}).encode()]
    statuses = [server.post("/v1/chat/completions", content=j, headers={"content-type": "application/json"}).status_code
                for j in junk * 3]
    for t in threads:
        t.join(60)
    assert set(statuses) == {400} and got == want


def test_a_request_past_its_time_limit_ends_with_what_is_final(defender):
    with LiveServer(lambda: defender, ServeOptions(request_timeout=0.3)) as srv:
        c = srv.client()
        full = defender.generate(messages=ask(PROMPTS[1]), config=GenerationConfig(max_new_tokens=450)).text
        r = c.chat.completions.create(model=TINY, messages=ask(PROMPTS[1]), max_tokens=450)
        assert r.choices[0].finish_reason == "length" and r.model_extra["rootdefense"]["finish_reason"] == "timeout"
        assert full.startswith(r.choices[0].message.content) and len(r.choices[0].message.content) < len(full)
        text, chunks = stream_text(c, model=TINY, messages=ask(PROMPTS[1]), max_tokens=450)
        assert full.startswith(text) and chunks[-1].model_extra["rootdefense"]["finish_reason"] == "timeout"
        assert srv.service.worker.rows() == 0


def test_prompts_are_logged_only_when_asked(defender, caplog):
    for log_prompts in (False, True):
        caplog.clear()
        with caplog.at_level("INFO", logger="rootdefense.serve"), \
                LiveServer(lambda: defender, ServeOptions(log_prompts=log_prompts)) as srv:
            srv.client().chat.completions.create(model=TINY, messages=ask("a secret question"), max_tokens=4)
        assert ("a secret question" in caplog.text) is log_prompts
        done = [r.getMessage() for r in caplog.records if " done: " in r.getMessage()]
        assert len(done) == 1 and "4 tokens" in done[0] and "first text" in done[0]  # one line per request, always


def test_exposure_warning_and_key_from_the_environment(monkeypatch):
    from rootdefense.errors import InputError
    from rootdefense.serving.access import api_key_from_env

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    monkeypatch.setenv("RD_KEY", "abc")
    assert api_key_from_env("RD_KEY") == "abc" and api_key_from_env(None) is None
    monkeypatch.delenv("RD_KEY")
    with pytest.raises(InputError, match="RD_KEY"):
        api_key_from_env("RD_KEY")


def test_serve_command_checks_its_options(monkeypatch):
    from click.testing import CliRunner

    from rootdefense.cli import cli

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    r = CliRunner().invoke(cli, ["serve", "--replicas", "2"])
    assert r.exit_code == 2 and "--replicas needs --ray" in r.output
    r = CliRunner().invoke(cli, ["serve", "--api-key-env", "NO_SUCH_KEY_VAR"])
    assert r.exit_code != 0 and "NO_SUCH_KEY_VAR" in (r.output + str(r.exception))


def test_sigterm_lets_a_running_stream_finish_and_exits_0(tmp_path):
    """`rootdefense serve` in its own process: SIGTERM while a stream runs; the stream ends
    normally ([DONE]) and the process exits with status 0."""
    from conftest import save_response_probe, save_tiny_model

    home = tmp_path / "home"
    env = {**os.environ, "ROOTDEFENSE_HOME": str(home)}
    folder = save_tiny_model(tmp_path / "model")
    model_id = folder.rstrip('/')
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import save_response_probe; "
            f"save_response_probe({model_id!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parent.parent)
    del save_response_probe
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rootdefense.cli", "serve", "--model", folder, "--defense", "rds",
                             "--drafter", "none", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": ask(PROMPTS[1]), "max_tokens": 300, "stream": True}
        lines = []
        with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        end = json.loads([x for x in lines if '"finish_reason": "' in x][-1][6:])
        assert end["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("rollback", ["answer", "sentence"])
@pytest.mark.parametrize("uncorrected", ["release", "withhold"])
def test_a_rolled_back_answer_streams_only_what_it_keeps(tiny_tokenizer, tmp_path, rollback, uncorrected):
    """rds-expert flags the answer late and rolls it back: the stream never carried the
    dropped text (its deltas add up to the non-streamed answer, byte for byte). When the
    steered text never carries the expert's correction (here: an end_lift no token reaches)
    it is withheld: OpenAI's finish reason content_filter, the engine's "withheld" in the
    extension, and the stream had sent none of it."""
    lm = LoadedModel(make_tiny_model(tiny_tokenizer, seed=MODEL_SEED), tiny_tokenizer, MODEL_ID, torch.float32,
                     torch.device("cpu"))
    expert = attach_expert(lm, write_expert(tiny_tokenizer, tmp_path / "expert"))
    g = torch.Generator().manual_seed(11)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"})
    ids, tau, _ = late_flag(lm, expert, probe)
    prompt = next(p for p in LATE_PROMPTS if encode_chat(lm.tokenizer, ask(p)).tolist() == ids.tolist())
    end_lift = 50.0 if uncorrected == "withhold" else 3.0
    d = Defender(lm, probe, DefenseSettings(defense="rds-expert", tau=tau, rollback=rollback,
                                            correction={"k": 1, "window": 1, "uncorrected": uncorrected,
                                                        "end_lift": end_lift}), expert=expert)
    with LiveServer(lambda: d) as srv:
        c = srv.client()
        whole = c.chat.completions.create(model=MODEL_ID, messages=ask(prompt), max_tokens=16)
        ext = whole.model_extra["rootdefense"]
        assert ext["rollbacks"] == 1
        text, chunks = stream_text(c, model=MODEL_ID, messages=ask(prompt), max_tokens=16)
        assert text.encode() == whole.choices[0].message.content.encode()
        end = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0]
        assert end.model_extra["rootdefense"]["rollbacks"] == 1
        assert srv.metric("rootdefense_rollbacks_total") == 2
        assert srv.metric("rootdefense_withheld_total") == (2 if uncorrected == "withhold" else 0)
        if uncorrected == "withhold":
            assert whole.choices[0].finish_reason == end.choices[0].finish_reason == "content_filter"
            assert ext["finish_reason"] == end.model_extra["rootdefense"]["finish_reason"] == "withheld"
            if rollback == "answer":
                assert whole.choices[0].message.content == "" and text == ""
        else:
            assert whole.choices[0].finish_reason in ("stop", "length") and whole.choices[0].message.content
