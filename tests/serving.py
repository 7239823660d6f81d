"""A live server for tests: the app on a free 127.0.0.1 port, uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import torch
import uvicorn
from conftest import make_tiny_model

from rootdefense.api import DefenseSettings, Defender
from rootdefense.models.loading import LoadedModel
from rootdefense.probes.base import LinearProbe
from rootdefense.serving import ServeOptions, create_app

TINY = "tiny-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_defender(tok, defense: str = "rds", tau: float = 0.5, expert=None, lm=None, **settings) -> Defender:
    """The tiny model with a random probe: ``tau`` 0.5 makes the threshold rule replace
    some tokens (the probe's harms spread around it)."""
    lm = lm or LoadedModel(make_tiny_model(tok), tok, TINY, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=tau,
                        meta={"model_id": lm.model_id, "kind": "response"})
    if defense == "rds":
        settings.setdefault("drafter", "ngram")
    return Defender(lm, probe, DefenseSettings(defense=defense, tau=tau, **settings), expert=expert)


class LiveServer:
    """``with LiveServer(load, options) as srv:`` -> ``srv.url``, ``srv.app``, ``srv.service``."""

    def __init__(self, load, options: ServeOptions | None = None, wait: bool = True):
        self.app = create_app(load, options or ServeOptions())
        self.service = self.app.state.service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait = wait
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.started and (not self.wait or self.service.defender is not None):
                return self
            if self.service.error:
                raise RuntimeError(self.service.error)
            time.sleep(0.02)
        raise TimeoutError("the test server did not start in 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, api_key: str = "unused", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = name + (f"{{{labels}}}" if labels else "")
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


def stream_text(client, **kw) -> tuple[str, list]:
    """The concatenated content deltas of a streamed chat answer, and every chunk."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks
