"""``rootdefense serve --ray``: the same app on Ray Serve replicas.

Each replica is one Ray actor that loads the model itself (from the CLI's model and defense
options, never a model shipped from the driver), then runs :func:`.app.create_app` with its
own model worker, lifespan and metrics: the routes, limits and answers are those of
``rootdefense serve``. Serve's HTTP proxy (on ``host:port``) spreads requests over the
replicas; a replica takes at most ``max_batch`` requests at a time (its batch) and the proxy
holds at most ``max_queue`` more, then answers 429 with ``Retry-After``. Each answer's
``system_fingerprint`` names the replica that served it (``rootdefense-<replica id>``).

A local Ray instance is started unless ``RAY_ADDRESS`` names a cluster; every node that may
hold a replica needs the package and the model's cache (``rootdefense prepare``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import replace

from ..errors import RootDefenseError
from .app import ServeOptions, create_app
from .run import GRACE_SECONDS, exposure_warning

log = logging.getLogger("rootdefense.serve")

APP_NAME = "rootdefense"
DEPLOYMENT_NAME = "RootDefense"
FORWARDED_ENV = ("ROOTDEFENSE_HOME", "HF_HOME", "HF_HUB_OFFLINE")  # passed on to the replicas when set here


class Replica:
    """The user class behind the deployment (wrapped by ``serve.ingress`` in :func:`deployment`).

    ``__init__`` loads the defender (the replica is not routed to until it has); Serve then
    calls ``__serve_build_asgi_app__`` for this replica's own app and runs its lifespan,
    which starts the model worker."""

    async def __init__(self, model_options: dict, options: ServeOptions, cwd: str | None = None):
        from ray import serve

        from ..cli import _defender

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as `serve` logs
        if cwd and os.path.isdir(cwd):  # relative model or probe folders mean what they meant to `serve`
            os.chdir(cwd)
        self.name = serve.get_replica_context().replica_tag
        self.options = replace(options, replica=f"{options.replica}-{self.name}" if options.replica else self.name)
        self.defender = await asyncio.to_thread(_defender, model_options)
        self.service = None  # (not `app`: Serve's wrapper has that property)

    def __serve_build_asgi_app__(self):
        app = create_app(lambda: self.defender, self.options, background=False)
        self.service = app.state.service
        return app

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose model worker died is restarted."""
        svc = self.service
        if svc is None or svc.worker is None:
            raise RuntimeError(f"replica {self.name}: the model worker is not running ({svc and svc.error})")
        if not svc.worker.thread.is_alive() and not svc.worker.stopping:
            raise RuntimeError(f"replica {self.name}: the model worker thread has stopped")


def deployment(model_options: dict, options: ServeOptions, replicas: int, *, num_cpus: float = 1,
               num_gpus: float = 0, env: dict | None = None):
    """The bound Serve application: ``replicas`` copies of :class:`Replica`."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    cls = serve.deployment(
        serve.ingress()(Replica),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options=actor,
        max_ongoing_requests=options.max_batch,  # a replica's batch; the rest wait at the proxy ...
        max_queued_requests=max(1, options.max_queue),  # Serve has no 0 (-1: no limit); --max-queue 0 holds 1
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),  # ... up to max_queue, then 429
        graceful_shutdown_timeout_s=GRACE_SECONDS,  # as uvicorn's: in-flight answers may finish
    )
    return cls.bind(model_options, options, os.getcwd())


class RayServer:
    """Ray (local or ``RAY_ADDRESS``), Serve's proxy on ``host:port`` and the replicas; ``close``
    undoes what ``start`` did: a Serve instance or Ray connection that was already there stays."""

    def __init__(self, model_options: dict, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
                 replicas: int = 1, *, num_cpus: float = 1, address: str | None = None):
        self.model_options, self.options = dict(model_options), options
        self.host, self.port, self.replicas, self.num_cpus = host, port, replicas, num_cpus
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self.started_ray = self.started_serve = self.deployed = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> RayServer:
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise RootDefenseError("--ray needs Ray Serve: pip install 'rootdefense[ray]' (ray[serve]==2.60.0)") \
                from exc
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        env["TOKENIZERS_PARALLELISM"] = "false"
        try:
            if not ray.is_initialized():
                ray.init(address=self.address, include_dashboard=False, logging_level="ERROR")
                self.started_ray = True
            try:  # a Serve instance already on the cluster stays; only this app goes at the end
                from ray.serve.context import _get_global_client

                running = _get_global_client(raise_if_no_controller_running=False) is not None
            except Exception:
                running = False
            serve.start(http_options={"host": self.host, "port": self.port})
            self.started_serve = not running
            gpus = ray.cluster_resources().get("GPU", 0) if self.model_options.get("device", "auto") != "cpu" else 0
            per_gpu = 0 if not gpus else (gpus / self.replicas if self.replicas > gpus else 1)
            app = deployment(self.model_options, self.options, self.replicas, num_cpus=self.num_cpus,
                             num_gpus=per_gpu, env=env)
            self.deployed = True  # (a failed deployment is deleted too)
            try:
                serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as exc:
                raise RootDefenseError(f"the replicas failed to start: {self._why() or exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _why() -> str | None:
        """The last line of the replicas' error (a failed constructor's traceback), if Serve kept it."""
        from ray import serve

        try:
            message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
        except Exception:
            return None
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        return lines[-1] if lines else None

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            if self.started_serve:
                serve.shutdown()
            elif self.deployed:
                serve.delete(APP_NAME)
        finally:
            self.started_serve = self.deployed = False
            if self.started_ray:
                ray.shutdown()
                self.started_ray = False

    def __enter__(self) -> RayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def serve_on_ray(model_options: dict, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
                 replicas: int = 1, *, stop: threading.Event | None = None, num_cpus: float = 1) -> None:
    """Deploy, serve until SIGINT/SIGTERM (or until ``stop`` is set, when given: then no signal
    handler is installed), then shut Serve down (replicas finish in-flight answers for up to
    ``GRACE_SECONDS``) and return."""
    warning = exposure_warning(host, options.api_key)
    if warning:
        print(warning, file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own_signals = stop is None
    stop = stop or threading.Event()
    with RayServer(model_options, options, host, port, replicas, num_cpus=num_cpus) as server:
        previous = {}
        if own_signals:  # after ray.init, which sets a SIGTERM handler of its own
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            where = f"the Ray cluster at {server.address}" if server.address else "a local Ray instance"
            print(f"serving {model_options.get('model')} on {server.url} with {replicas} replica(s) on {where}"
                  f"{'; Ctrl-C stops' if own_signals else ''}", file=sys.stderr)
            while not stop.wait(1.0):
                pass
            print("stopping: in-flight answers may finish, then Serve shuts down", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
