"""The HTTP layer: an OpenAI-compatible FastAPI app over one model worker.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` (503 while the model loads), ``GET /metrics`` (Prometheus text) and
``GET /`` (the playground page). Every error is OpenAI's shape. The app only checks
requests, turns them into engine requests and answers; decoding happens in the worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding.config import GenerationConfig
from ..decoding.engine import Request as EngineRequest
from ..models.chat import encode_chat
from . import protocol
from .errors import APIError, bad, error_body
from .metrics import Metrics
from .worker import ModelWorker, Ticket

log = logging.getLogger("rootdefense.serve")


@dataclass
class ServeOptions:
    api_key: str | None = None  # clients send it as "Authorization: Bearer KEY"
    max_batch: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting for a slot; beyond it: 429
    max_body: int = 1_000_000  # bytes; beyond it: 413
    request_timeout: float = 300.0  # seconds from arrival; then the answer ends ("timeout")
    allow_undefended: bool = False  # may a request turn the defense off or weaken it?
    log_prompts: bool = False  # log prompts and answers (off: only ids, sizes and timings)
    default_max_tokens: int = 256  # when a request gives none (less if the context is shorter)
    temperature: float = 0.0  # when a request gives none: greedy, as the defense was measured
    replica: str | None = None  # names the process in each answer's system_fingerprint


class Service:
    """What the routes share: the loaded defender, its worker and the metrics."""

    def __init__(self, load: Callable, options: ServeOptions):
        self.load, self.options = load, options
        self.metrics = Metrics()
        self.defender = None
        self.worker: ModelWorker | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._stopped = False
        self._loader: threading.Thread | None = None

    def start(self, background: bool = True) -> None:
        if background:
            self._loader = threading.Thread(target=self._load, name="rootdefense-load", daemon=True)
            self._loader.start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            d = self.load()
            o = self.options
            with self._lock:  # a shutdown during the load: no worker is started after it
                if self._stopped:
                    log.info("the model loaded after shutdown began; not serving it")
                    return
                self.worker = ModelWorker(d, max_batch=o.max_batch, max_queue=o.max_queue,
                                          allow_undefended=o.allow_undefended, metrics=self.metrics).start()
                self.defender = d
            log.info("serving %s with the %s defense", d.lm.model_id, d.settings.defense)
        except Exception as e:  # the health check says why
            log.exception("the model could not be loaded")
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            worker = self.worker
        if worker is not None:
            worker.stop()

    @property
    def model(self) -> str:
        return self.defender.lm.model_id

    def ready(self) -> None:
        if self.defender is None:
            msg = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, msg, code="model_not_ready", headers={"Retry-After": "5"})

    def encode(self, ask: protocol.Ask) -> tuple[list[int], int]:
        """Prompt ids and max new tokens; 400 context_length_exceeded when they do not fit."""
        lm = self.defender.lm
        if ask.kind == "chat":
            ids = encode_chat(lm.tokenizer, ask.messages)[0].tolist()
            param = "messages"
        else:
            ids = lm.tokenizer(ask.prompt, add_special_tokens=False)["input_ids"]
            param = "prompt"
        room = lm.max_context - len(ids)
        want = ask.max_tokens if ask.max_tokens is not None else min(self.options.default_max_tokens, room)
        if want > room or room < 1:
            raise bad(f"this model's context is {lm.max_context} tokens; the prompt is {len(ids)} tokens and "
                      f"{want} new tokens were asked for; shorten the prompt or lower max_tokens", param,
                      "context_length_exceeded")
        return ids, want


async def read_body(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {size} bytes; this server accepts at most {limit}",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    return bytes(body)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(load: Callable, options: ServeOptions | None = None, *, background: bool = True) -> FastAPI:
    """The app. ``load()`` returns the :class:`rootdefense.api.Defender` to serve; it runs at
    startup (in a thread when ``background``, so /health answers 503 meanwhile)."""
    opts = options or ServeOptions()
    svc = Service(load, opts)

    @asynccontextmanager
    async def lifespan(app):
        svc.start(background)
        yield
        svc.stop()

    app = FastAPI(title="rootdefense", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    # ------------------------------------------------------------------ errors, key, counts

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(error_body(e.status_code, msg.get(e.status_code, str(e.detail))), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return JSONResponse(error_body(400, str(e)), 400)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        log.exception("unexpected error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), 500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        endpoint = path if path.startswith("/v1/") or path in ("/", "/health", "/metrics") else "other"
        if opts.api_key and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), opts.api_key.encode()):
                svc.metrics.requests.labels(endpoint, "401").inc()
                return APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                code="invalid_api_key").response()
        response = await call_next(request)
        svc.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if svc.defender is None:
            return APIError(503, "the model failed to load: " + svc.error if svc.error else "loading",
                            code="model_not_ready").response()
        return {"status": "ok", "model": svc.model, "defense": svc.defender.settings.defense}

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("rootdefense.serving").joinpath("playground.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models():
        svc.ready()
        d = svc.defender
        info = {"defense": d.settings.defense, "threshold": svc.worker.tau, "allow_undefended": opts.allow_undefended,
                "max_context": d.lm.max_context, "settings_source": d.settings.source}
        return {"object": "list", "data": [{"id": svc.model, "object": "model", "created": svc.created,
                                            "owned_by": "rootdefense", "rootdefense": info}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    async def answer(request: Request, kind: str):
        t0 = time.perf_counter()
        svc.ready()
        raw = await read_body(request, opts.max_body)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        ask = protocol.parse(body, kind)
        if ask.model is not None and ask.model != svc.model:
            raise APIError(404, f"the model '{ask.model}' does not exist here; this server serves '{svc.model}'",
                           "model", "model_not_found")
        lane = svc.worker.lane_for(ask.defense.defense, ask.defense.tau)
        ids, max_tokens = svc.encode(ask)
        temperature = opts.temperature if "temperature" not in body or body["temperature"] is None \
            else ask.temperature
        try:
            cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=ask.top_p,
                                   seed=ask.seed, stop=ask.stop)
        except Exception as e:
            raise bad(str(e)) from None
        ticket = Ticket(lane, EngineRequest(ids, cfg), asyncio.get_running_loop(), opts.request_timeout)
        svc.worker.submit(ticket)
        rid = protocol.new_id(kind)
        defense = "none" if lane[0] == "none" else svc.defender.settings.defense
        if opts.log_prompts:
            log.info("%s prompt: %r", rid, ask.messages if kind == "chat" else ask.prompt)
        else:
            log.info("%s: %d prompt tokens, max %d new, lane %s", rid, len(ids), max_tokens, lane)
        run = Answer(svc, ask, ticket, rid, defense, len(ids), t0)
        if ask.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.whole(request)

    return app


class Answer:
    """One request's answer as it arrives from the worker: streamed or whole."""

    def __init__(self, svc: Service, ask: protocol.Ask, ticket: Ticket, rid: str, defense: str, prompt_tokens: int,
                 t0: float):
        self.svc, self.ask, self.ticket, self.rid, self.defense = svc, ask, ticket, rid, defense
        self.prompt_tokens, self.t0 = prompt_tokens, t0
        self.sent_tokens, self.t_first = 0, None
        self.fingerprint = f"rootdefense-{svc.options.replica}" if svc.options.replica else None

    def _text(self, text: str, steps: list):
        self.sent_tokens += len(steps)
        if text and self.t_first is None:
            self.t_first = time.perf_counter()
            self.svc.metrics.ttft.observe(self.t_first - self.t0)

    def _end(self, gen, reason: str) -> tuple[dict, dict]:
        """The extension report and the usage, counted once."""
        from ..decoding.trace import Trace

        m = self.svc.metrics
        trace = gen.trace if gen is not None else Trace()
        done = gen is not None and reason not in ("timeout", "disconnect", "shutdown", "cancelled")
        tokens = len(gen.token_ids) if done else self.sent_tokens
        m.tokens_out.inc(tokens)
        m.tokens_replaced.inc(trace.replaced)
        rollbacks = trace.summary()["rollbacks"]
        m.rollbacks.inc(rollbacks)
        if reason == "withheld":
            m.withheld.inc()
        took = time.perf_counter() - self.t0
        m.latency.observe(took)
        first = "-" if self.t_first is None else f"{self.t_first - self.t0:.2f}s"
        log.info("%s done: %s, %d tokens (%d replaced, %d rollbacks), first text %s, total %.2fs", self.rid,
                 reason, tokens, trace.replaced, rollbacks, first, took)
        if self.svc.options.log_prompts and gen is not None:
            log.info("%s answer: %r", self.rid, gen.text)
        report = protocol.defense_report(self.defense, trace, reason, self.ask.defense.trace)
        return report, protocol.usage(self.prompt_tokens, tokens)

    def _stamp(self, obj: dict) -> dict:
        if self.fingerprint:
            obj["system_fingerprint"] = self.fingerprint
        return obj

    async def whole(self, request: Request):
        pieces, views = [], []
        events = self.ticket.events
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), 0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    self.svc.worker.cancel(self.ticket, "disconnect")
                continue
            if ev[0] == "text":
                self._text(ev[1], ev[2])
                pieces.append(ev[1])
                if self.ask.defense.trace:
                    views += [protocol.token_view(s) for s in ev[2]]
            elif ev[0] == "error":
                self.svc.metrics.latency.observe(time.perf_counter() - self.t0)
                raise APIError(500, ev[1], code="decoding_failed")
            else:
                _, gen, reason = ev
                report, use = self._end(gen, reason)
                return self._stamp(protocol.completion(self.ask, self.rid, self.svc.model, "".join(pieces), reason,
                                                       report, use, views if self.ask.defense.trace else None))

    async def stream(self):
        ask, created, model = self.ask, int(time.time()), self.svc.model
        views: list = []
        try:
            if ask.kind == "chat":
                yield sse(self._stamp(protocol.chunk(ask, self.rid, model, created, "", role=True)))
            while True:
                ev = await self.ticket.events.get()
                if ev[0] == "text":
                    _, text, steps = ev
                    self._text(text, steps)
                    if ask.defense.trace:
                        views += [protocol.token_view(s) for s in steps]
                    if text:
                        yield sse(self._stamp(protocol.chunk(ask, self.rid, model, created, text, tokens=views)))
                        views = []
                elif ev[0] == "error":
                    yield sse(error_body(500, ev[1], code="decoding_failed"))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    _, gen, reason = ev
                    report, use = self._end(gen, reason)
                    yield sse(self._stamp(protocol.chunk(ask, self.rid, model, created, None,
                                                         reason=protocol.finish_reason(reason), report=report,
                                                         tokens=views)))
                    if ask.include_usage:
                        yield sse(self._stamp(protocol.usage_chunk(ask, self.rid, model, created, use)))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not self.ticket.finished:  # the client went away: free the batch slot
                self.svc.worker.cancel(self.ticket, "disconnect")
