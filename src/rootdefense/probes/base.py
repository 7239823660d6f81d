"""A harm probe: a linear read-out of one layer's hidden state, saved as safetensors + JSON.

Every probe kind (standardise -> optional PCA -> logistic regression) is affine end to end,
so it is stored collapsed to one weight vector and bias: harm = sigmoid(h @ w + b). The
JSON beside it records how it was made and how well it does, so a user can judge it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ProbeError

FORMAT_VERSION = 1
KINDS = ("paper", "query", "response")
WEIGHTS = "probe.safetensors"
META = "probe.json"


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (hidden,)
    bias: float
    layer: int  # index into the model's hidden_states tuple (0 = embeddings)
    threshold: float  # calibrated harm threshold (tau default)
    meta: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def model_id(self) -> str | None:
        return self.meta.get("model_id")

    def to(self, device) -> LinearProbe:
        self.weight = self.weight.to(device)
        return self

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.to(hidden.device).float() + self.bias

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Harm probability for each row of ``hidden`` (N, hidden)."""
        return torch.sigmoid(self.logit(hidden))

    # ---- persistence -------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().cpu().float().contiguous(),
                   "bias": torch.tensor([self.bias], dtype=torch.float32)}, str(folder / WEIGHTS))
        meta = dict(self.meta, format_version=FORMAT_VERSION, layer=self.layer,
                    threshold=self.threshold, hidden_size=self.hidden_size)
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        if not (folder / WEIGHTS).exists() or not (folder / META).exists():
            raise ProbeError(f"no probe at '{path}': expected {WEIGHTS} and {META} in that folder")
        try:
            meta = json.loads((folder / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProbeError(f"probe metadata {folder / META} is corrupt: {exc}") from exc
        try:
            tensors = load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ProbeError(f"probe weights {folder / WEIGHTS} are corrupt: {exc}") from exc
        for key in ("layer", "threshold", "hidden_size", "model_id"):
            if key not in meta:
                raise ProbeError(f"probe metadata {folder / META} lacks '{key}'")
        if set(tensors) != {"weight", "bias"} or tensors["weight"].ndim != 1:
            raise ProbeError(f"probe weights {folder / WEIGHTS} hold unexpected tensors {sorted(tensors)}")
        if tensors["weight"].shape[0] != meta["hidden_size"]:
            raise ProbeError(f"probe weights have size {tensors['weight'].shape[0]} but metadata says "
                             f"hidden_size {meta['hidden_size']}")
        if not torch.isfinite(tensors["weight"]).all():
            raise ProbeError(f"probe weights {folder / WEIGHTS} contain NaN or inf")
        return cls(weight=tensors["weight"], bias=float(tensors["bias"][0]), layer=int(meta["layer"]),
                   threshold=float(meta["threshold"]), meta=meta)

    def check_model(self, model_id: str, hidden_size: int, num_layers: int) -> None:
        """Refuse to score a model the probe was not trained on."""
        if self.model_id != model_id:
            raise ProbeError(f"probe was trained for model '{self.model_id}', not '{model_id}'; "
                             f"train one with `rootdefense probe train --model {model_id}`")
        if self.hidden_size != hidden_size:
            raise ProbeError(f"probe expects hidden size {self.hidden_size}, model has {hidden_size}")
        if not 0 <= self.layer <= num_layers:
            raise ProbeError(f"probe layer {self.layer} does not exist in a {num_layers}-layer model")
