"""The model worker: one thread that owns the model and runs continuous batching.

Requests are tickets. A ticket waits in a bounded queue until the running batch has a free
slot, joins it at the next decoding step (the engine prefills it on its own and merges it
into the batch cache), and leaves when its answer ends, its client goes away or its time
runs out: iteration-level scheduling, as vLLM and TGI do. The worker loop reads::

    take new tickets and cancellations -> admit waiting tickets while slots are free
    -> one engine step for every defense lane with rows -> repeat

A *lane* is one defense configuration with its own engine: the server's defense, and, on
demand, a stricter threshold a request asked for, or (only when the operator allowed it)
no defense. Every lane shares the one loaded model.

A ticket is the engine's streamer for its row: it receives only text the defense can no
longer withdraw (:mod:`rootdefense.decoding.streamer`) and hands it to the request's
asyncio queue, thread-safely.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from ..decoding.engine import Engine, Request
from ..decoding.streamer import Streamer
from .errors import APIError, bad
from .metrics import Metrics

log = logging.getLogger("rootdefense.serve")

MAX_LANES = 8  # distinct defense configurations held at once (idle ones are dropped first)


class Ticket(Streamer):
    """One request inside the worker; the HTTP side reads ``events``:
    ``("text", piece, steps)``, then ``("end", generation, reason)`` or ``("error", message)``."""

    def __init__(self, lane: tuple, request: Request, loop: asyncio.AbstractEventLoop, timeout: float | None):
        self.lane, self.request, self.loop = lane, request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.deadline = None if timeout is None else self.t0 + timeout
        self.row = None
        self.stop_reason: str | None = None  # why it was cancelled: "timeout", "disconnect", "shutdown"
        self.finished = False
        request.streamer = self

    def _send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def put(self, text: str, steps: list) -> None:
        self._send(("text", text, steps))

    def end(self, generation) -> None:
        self.finished = True
        reason = generation.trace.finish_reason
        if reason == "cancelled":
            reason = self.stop_reason or "cancelled"
        self._send(("end", generation, reason))

    def fail(self, message: str) -> None:
        self.finished = True
        self._send(("error", message))


@dataclass
class Lane:
    key: tuple
    defense: str
    engine: Engine
    last_used: float = 0.0


class ModelWorker:
    def __init__(self, defender, *, max_batch: int = 16, max_queue: int = 64, allow_undefended: bool = False,
                 metrics: Metrics | None = None):
        self.defender = defender
        self.max_batch, self.max_queue = max_batch, max_queue
        self.allow_undefended = allow_undefended
        self.metrics = metrics or Metrics()
        s = defender.settings
        self.defense = s.defense
        self.tau = None
        if s.defense != "none" and defender.probe is not None:
            self.tau = s.tau if s.tau is not None else defender.probe.threshold
        self.base_key = (s.defense, None)
        self.lanes: dict[tuple, Lane] = {}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.cancels: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Ticket] = deque()
        self.active: set[Ticket] = set()
        self.queued = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="rootdefense-model-worker", daemon=True)

    # ------------------------------------------------------------------ the HTTP side

    def start(self) -> ModelWorker:
        self.thread.start()
        return self

    def lane_for(self, defense: str | None, tau: float | None) -> tuple:
        """The lane a request's ``rootdefense`` asks for; only stricter than the server's,
        unless the operator allowed undefended answers."""
        if defense is not None and defense not in (self.defense, "none"):
            raise bad(f"this server runs the '{self.defense}' defense; a request may ask for it or, where the "
                      "operator allows it, for 'none'", "rootdefense.defense")
        if defense == "none" and self.defense != "none":
            if not self.allow_undefended:
                raise bad("turning the defense off is not allowed on this server (start it with "
                          "--allow-undefended to permit it)", "rootdefense.defense", "defense_not_weakenable")
            if tau is not None:
                raise bad("'tau' has no meaning without a defense", "rootdefense.tau")
            return ("none", None)
        if tau is None:
            return self.base_key
        if self.tau is None:
            raise bad("this server runs no defense, so there is no threshold to set", "rootdefense.tau")
        if self.defense == "rds" and self.defender.settings.rule == "paper":
            raise bad("the paper rule takes no threshold", "rootdefense.tau")
        if tau > self.tau and not self.allow_undefended:
            raise bad(f"tau={tau} would weaken the defense (the server's threshold is {self.tau:.4g}; a request "
                      "may only lower it)", "rootdefense.tau", "defense_not_weakenable")
        return (self.defense, round(float(tau), 6))

    def submit(self, ticket: Ticket) -> None:
        with self.lock:
            if self.stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self.queued >= self.max_queue:
                raise APIError(429, f"the server is busy: {self.queued} requests are waiting (the queue holds "
                               f"{self.max_queue}); retry shortly", code="queue_full", headers={"Retry-After": "1"})
            self.queued += 1
        self.inbox.put(ticket)
        self.wake.set()

    def cancel(self, ticket: Ticket, reason: str) -> None:
        if ticket.finished:
            return
        ticket.stop_reason = ticket.stop_reason or reason
        self.cancels.put(ticket)
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is still queued or running and end the thread."""
        with self.lock:
            self.stopping = True
        for t in list(self.active) + list(self.waiting):
            self.cancel(t, "shutdown")
        self.wake.set()
        self.thread.join(timeout)

    def rows(self) -> int:
        return sum(len(lane.engine.live) + len(lane.engine.pending) for lane in self.lanes.values())

    # ------------------------------------------------------------------ the worker thread

    def _lane(self, key: tuple) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            if len(self.lanes) >= MAX_LANES:
                idle = [k for k, v in self.lanes.items() if not v.engine.busy and k != self.base_key]
                if idle:
                    del self.lanes[min(idle, key=lambda k: self.lanes[k].last_used)]
            lane = self.lanes[key] = Lane(key, key[0], self._engine(key))
        lane.last_used = time.monotonic()
        return lane

    def _engine(self, key: tuple) -> Engine:
        from ..api import DefenseSettings, Defender

        d = self.defender
        if key != self.base_key:
            s = d.settings
            if key[0] == "none":
                settings = DefenseSettings(defense="none", rule=s.rule, drafter=s.drafter, max_draft=s.max_draft,
                                           source="undefended, allowed by the operator")
            else:
                settings = replace(s, tau=key[1], source=s.source + f"; tau {key[1]} asked by the request")
            d = Defender(d.lm, d.probe, settings, expert=d.expert)
        return d._batch_decoder().engine()

    def _run(self) -> None:
        while True:
            self._take()
            if self.stopping and not self.active and not self.waiting:
                break
            busy = [lane for lane in self.lanes.values() if lane.engine.busy]
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            for lane in busy:
                try:
                    lane.engine.step()
                except Exception as e:  # a failed step fails its lane's requests, never the server
                    log.exception("decoding step failed")
                    self._fail_lane(lane, f"decoding failed: {type(e).__name__}: {e}")
            self.steps += 1
            self.metrics.steps.inc()
            self._forget_finished()

    def _take(self) -> None:
        """New tickets, cancellations and deadlines; then fill free batch slots."""
        while True:
            try:
                t = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.waiting.append(t)
        now = time.perf_counter()
        for t in list(self.active) + list(self.waiting):
            if t.deadline is not None and now > t.deadline and not t.finished:
                t.stop_reason = t.stop_reason or "timeout"
                self.cancels.put(t)
        while True:
            try:
                t = self.cancels.get_nowait()
            except queue.Empty:
                break
            self._cancel(t)
        self._forget_finished()
        while self.waiting and self.rows() < self.max_batch:
            t = self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            try:
                t.row = self._lane(t.lane).engine.add(t.request)
            except Exception as e:
                log.exception("a request could not join the batch")
                t.fail(f"the request could not join the batch: {e}")
                continue
            self.active.add(t)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.batch_size.set(self.rows())

    def _cancel(self, t: Ticket) -> None:
        if t.finished:
            return
        self.metrics.cancelled.labels(t.stop_reason or "cancelled").inc()
        if t in self.waiting:
            self.waiting.remove(t)
            with self.lock:
                self.queued -= 1
            t.finished = True
            t._send(("end", None, t.stop_reason or "cancelled"))
            return
        self.lanes[t.lane].engine.cancel(t.row)  # the row leaves now; its streamer gets its end

    def _forget_finished(self) -> None:
        for t in [t for t in self.active if t.finished]:
            self.active.discard(t)
        self.metrics.batch_size.set(self.rows())

    def _fail_lane(self, lane: Lane, message: str) -> None:
        for t in [t for t in self.active if t.lane == lane.key]:
            t.fail(message)
        lane.engine = self._engine(lane.key)  # a fresh cache; the model is untouched
