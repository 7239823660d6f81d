"""The defended OpenAI-compatible server: ``rootdefense serve``.

- :mod:`.protocol`: the OpenAI request and response formats, with the ``rootdefense`` extension;
- :mod:`.worker`: the model worker, continuous batching over the engine;
- :mod:`.app`: the FastAPI app (routes, errors, API key, limits);
- :mod:`.metrics`: Prometheus metrics; :mod:`.run`: uvicorn (and Ray Serve) start-up;
- ``playground.html``: the page at ``GET /``.
"""

from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
