"""Load a trained expert adapter onto a loaded model, after checking it was made for it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExpertError
from ..paths import expert_dir

EXPERT_ADAPTER = "expert"
META = "expert.json"


@dataclass
class ExpertInfo:
    path: Path
    meta: dict


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / META).exists() or not (folder / "adapter_model.safetensors").exists():
        raise ExpertError(f"no expert adapter at '{folder}': expected {META} and adapter_model.safetensors; "
                          "train one with `rootdefense expert train`")
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExpertError(f"expert metadata {folder / META} is corrupt: {exc}") from exc
    for key in ("model_id", "hidden_size"):
        if key not in meta:
            raise ExpertError(f"expert metadata {folder / META} lacks '{key}'")
    return meta


def load_expert(lm, folder: str | Path | None = None):
    """Wrap ``lm.model`` in a PeftModel holding the expert as adapter ``expert``. The base
    model stays reachable in the same forward with ``adapter_names=["__base__", ...]``."""
    from peft import PeftModel

    folder = Path(folder) if folder else expert_dir(lm.model_id)
    meta = read_meta(folder)
    if meta["model_id"] != lm.model_id:
        raise ExpertError(f"expert adapter was trained for model '{meta['model_id']}', not '{lm.model_id}'; "
                          f"train one with `rootdefense expert train --model {lm.model_id}`")
    if meta["hidden_size"] != lm.hidden_size:
        raise ExpertError(f"expert adapter expects hidden size {meta['hidden_size']}, model has {lm.hidden_size}")
    try:
        model = PeftModel.from_pretrained(lm.model, str(folder), adapter_name=EXPERT_ADAPTER)
    except Exception as exc:  # peft raises many types on a bad file
        raise ExpertError(f"cannot load expert adapter from {folder}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, ExpertInfo(path=folder, meta=meta)


@dataclass
class SharedExpert:
    """The expert adapter injected into a loaded model, switched OFF by default so that the
    model (``lm.model``) keeps computing exactly the base model; :meth:`active` switches it
    on for mixed base/expert forwards (``adapter_names=["__base__", "expert"]``)."""

    peft_model: Any
    info: ExpertInfo

    @contextmanager
    def active(self) -> Iterator[Any]:
        """The PeftModel with the expert enabled; disabled again on exit."""
        self.peft_model.base_model.enable_adapter_layers()
        try:
            yield self.peft_model
        finally:
            self.peft_model.base_model.disable_adapter_layers()


def attach_expert(lm, folder: str | Path | None = None) -> SharedExpert:
    """Load the expert into ``lm.model`` (checked against it), switched off, leaving the
    base weights' ``requires_grad`` flags as they were."""
    grads = [(p, p.requires_grad) for p in lm.model.parameters()]
    peft_model, info = load_expert(lm, folder)
    peft_model.base_model.disable_adapter_layers()  # the shared model stays the base model
    for param, flag in grads:  # peft froze the base weights; leave them as they were
        param.requires_grad_(flag)
    return SharedExpert(peft_model, info)
