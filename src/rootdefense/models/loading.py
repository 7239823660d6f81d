"""Load a causal LM and its tokenizer by embedded name, hub name or local path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from . import kernels
from .embedded import EMBEDDED_NAME, embedded_dir, ensure_embedded

EMBEDDED_MODELS = (EMBEDDED_NAME,)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the identity that probes are checked against."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    dtype: torch.dtype
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_context(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or 2048)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def resolve_model_path(name: str, prepare: bool = True) -> str:
    """Map a model argument to what ``from_pretrained`` takes."""
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded() if prepare else embedded_dir())
    if os.path.isdir(name):
        if not (Path(name) / "config.json").exists():
            raise ModelError(f"'{name}' is a folder but holds no config.json: not a transformers model")
        return name
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ModelError(f"model path '{name}' does not exist")
    return name  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)


def load_model(name: str = EMBEDDED_NAME, dtype: str = "float32", device: str = "auto") -> LoadedModel:
    """Load ``name`` (embedded name, hub id or folder) for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(name)
    dev = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as exc:
        raise ModelError(
            f"cannot load model '{name}': {str(exc).splitlines()[0]} "
            f"(built-in models: {', '.join(EMBEDDED_MODELS)}; or give a hub id or a local folder)"
        ) from exc
    except ValueError as exc:
        raise ModelError(f"'{name}' is not a causal language model: {str(exc).splitlines()[0]}") from exc
    model.to(dev).eval()
    kernels.install(model)  # size-picked linear products on CPU (models/kernels.py)
    model_id = EMBEDDED_NAME if name in EMBEDDED_MODELS else name.rstrip("/")
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, dtype=DTYPES[dtype], device=dev)
