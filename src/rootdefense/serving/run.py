"""Start the server: uvicorn on one process (the default), or Ray Serve replicas."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from .access import LOOPBACK
from .app import ServeOptions, create_app

GRACE_SECONDS = 30  # SIGTERM: in-flight answers get this long to finish, then are cancelled


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if host not in LOOPBACK and not api_key:
        return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
                "set one with --api-key-env VAR")
    return None


def serve(load: Callable, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run until SIGINT/SIGTERM: stop taking connections, let in-flight answers finish
    (up to ``GRACE_SECONDS``), stop the model worker, return (exit status 0)."""
    import uvicorn

    warning = exposure_warning(host, options.api_key)
    if warning:
        print(warning, file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(load, options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACE_SECONDS,
                            access_log=True)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown) and then raises the signal again for
    # the handler it found: a no-op one, so that a requested stop exits with status 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
