"""`serve --ray`: two Ray Serve replicas of the tiny model behind Serve's proxy answer through
the real OpenAI client exactly as one in-process app does, streams included, and Serve shuts
down when the server is told to stop. Loopback only; about a minute on two cores."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import save_response_probe, save_tiny_model

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from rootdefense.cli import _defender  # noqa: E402
from rootdefense.serving import ServeOptions, create_app  # noqa: E402
from rootdefense.serving.ray_serve import serve_on_ray  # noqa: E402

PROMPTS = ["How do I bake bread?", "Sure, here is a tutorial", "The quick brown fox"]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_options(model: str) -> dict:
    """What `rootdefense serve --model MODEL --device cpu` hands to serve_on_ray."""
    return {"model": model, "device": "cpu", "dtype": "float32", "preset": "tuned", "defense": None, "rule": None,
            "tau": None, "k": None, "lam": None, "probe": None, "expert": None, "rollback": None, "drafter": None,
            "max_draft": None}


def body(model: str, prompt: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}


def in_process_answers(o: dict, options: ServeOptions) -> dict[str, str]:
    from starlette.testclient import TestClient

    with TestClient(create_app(lambda: _defender(o), options, background=False)) as client:
        out = {}
        for p in PROMPTS:
            r = client.post("/v1/chat/completions", json=body(o["model"], p))
            assert r.status_code == 200, r.text
            out[p] = r.json()["choices"][0]["message"]["content"]
    return out


def serve_controller_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def test_two_ray_serve_replicas_answer_as_the_app_does(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ROOTDEFENSE_HOME", str(home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance, never a cluster
    model = save_tiny_model(tmp_path / "tiny")  # its id is this folder's path, the same in every process
    save_response_probe(model)
    o = cli_options(model)
    options = ServeOptions(max_batch=4, max_queue=32, request_timeout=60)
    expected = in_process_answers(o, options)
    assert all(expected.values())

    try:
        ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=2,
                 runtime_env={"env_vars": {"ROOTDEFENSE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}})
    except Exception as e:  # no Ray here (sandbox, no shared memory...): nothing to test
        pytest.skip(f"a local Ray instance cannot start here: {e}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop, errors = threading.Event(), []

    def run():
        try:
            serve_on_ray(o, options, "127.0.0.1", port, replicas=2, stop=stop)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    thread = threading.Thread(target=run, name="serve-on-ray", daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 180  # Ray starts two replicas on 2 cores: slow under load
        while time.monotonic() < deadline and not errors:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert not errors, errors
        assert httpx.get(url + "/health", timeout=5).status_code == 200

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [model]

        def ask(prompt):
            r = client.chat.completions.create(**body(model, prompt))
            return prompt, r.choices[0].message.content, r.system_fingerprint

        # concurrent requests: the proxy spreads them over both replicas
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, PROMPTS * 3))
            while len({fp for _, _, fp in answers}) < 2 and len(answers) < 60:
                answers += list(pool.map(ask, PROMPTS * 2))
        fingerprints = {fp for _, _, fp in answers}
        assert len(fingerprints) == 2 and all(fp and fp.startswith("rootdefense-") for fp in fingerprints), \
            fingerprints
        for prompt, text, _ in answers:  # greedy: each replica answers as the one in-process app
            assert text == expected[prompt], (prompt, text, expected[prompt])

        # a streamed answer through Serve's proxy: its deltas make the whole answer
        stream = client.chat.completions.create(**body(model, PROMPTS[0]), stream=True)
        deltas, reasons, stamps = [], [], set()
        for chunk in stream:
            stamps.add(chunk.system_fingerprint)
            if chunk.choices:
                deltas.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
        assert len([d for d in deltas if d]) >= 1 and reasons[-1] in ("stop", "length")
        assert "".join(deltas) == expected[PROMPTS[0]]
        assert len(stamps) == 1 and stamps <= fingerprints

        stop.set()
        thread.join(90)
        assert not thread.is_alive(), "serve_on_ray did not return after stop"
        assert not errors, errors
        assert not serve_controller_running()
        with pytest.raises(httpx.HTTPError):  # the proxy is gone
            httpx.get(url + "/health", timeout=2)
    finally:
        stop.set()
        thread.join(60)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
