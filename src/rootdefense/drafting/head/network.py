"""The draft head's network: one decoder layer of the target's own kind that reads the
target's features and predicts its next feature (EAGLE), with its save and load.

Input at position t is ``[f_t ; e(x_{t+1})]``: the target's final feature at t (the output
of its final norm, what its LM head reads) and the embedding of the token that followed,
mapped to the hidden size by one linear layer; one decoder layer (causal attention over a
recent window) turns the sequence into predicted features, and the target's LM head,
restricted to a reduced draft vocabulary (the tokens the target used most in its own
answers), turns a predicted feature into a draft token. Embeddings and LM head are the
target's, frozen and never saved with the head. With ``taps`` the head also reads some inner
layers of the target (EAGLE-3's low, middle and high features), fused with the final feature
(:meth:`DraftHead.lift`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import InputError, ModelError
from ...models import kernels

WEIGHTS, META, FORMAT_VERSION = "head.safetensors", "head.json", 1


def target_decoder(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for name in ("layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise ModelError(f"draft heads need a decoder with '{name}' (Llama-style); "
                             f"{type(model).__name__} has none: use --drafter ngram")
    return decoder


class DraftHead(nn.Module):
    """fc([feature ; embedding]) -> one decoder layer -> norm: the predicted next feature.

    With ``taps`` (extra target layers, as EAGLE-3 reads low and middle layers beside the
    final one), a target position's raw feature is the concatenation of those layers' hidden
    states and the final feature, fused to the hidden size by one more linear layer
    (:meth:`lift`). The head's own predicted features (its drafted positions) are already of
    hidden size and are read as they are. Each tapped layer is RMS-normalised before the
    fusion, which starts as "take the final feature", so a head without taps can be extended
    with them and keep what it had learned."""

    def __init__(self, target, vocab_ids: torch.Tensor, taps: tuple[int, ...] = ()):
        super().__init__()
        decoder = target_decoder(target)
        cfg = copy.deepcopy(target.config.get_text_config())
        check_taps(taps, int(cfg.num_hidden_layers))
        cfg.num_hidden_layers = 1
        if hasattr(cfg, "layer_types") and cfg.layer_types:
            cfg.layer_types = cfg.layer_types[:1]
        h = cfg.hidden_size
        self.taps = tuple(int(t) for t in taps)
        if self.taps:
            # the residual stream inside the model has outliers (one dimension reaches ~25,000
            # at attention-sink positions on SmolLM2): each tapped layer is RMS-normalised first
            norm_type, eps = type(decoder.norm), getattr(cfg, "rms_norm_eps", 1e-6)
            self.tap_norms = nn.ModuleList(norm_type(h, eps=eps) for _ in self.taps)
            self.fuse = nn.Linear((len(self.taps) + 1) * h, h, bias=False)
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, -h:] = torch.eye(h)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layer = type(decoder.layers[0])(cfg, layer_idx=0)
        self.norm = type(decoder.norm)(h, eps=getattr(cfg, "rms_norm_eps", 1e-6))
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        self.hidden_size = h
        self.config = cfg

    @property
    def raw_size(self) -> int:
        """The width of a target position's raw feature (taps and final, concatenated)."""
        return (len(self.taps) + 1) * self.hidden_size

    def lift(self, raw: torch.Tensor) -> torch.Tensor:
        """A target position's raw feature (..., raw_size) as the head reads it (..., H)."""
        if not self.taps:
            return raw
        parts = raw.split(self.hidden_size, dim=-1)
        return self.fuse(torch.cat([norm(p) for norm, p in zip(self.tap_norms, parts, strict=False)] + [parts[-1]],
                                   dim=-1))

    def forward(self, features: torch.Tensor, next_embeds: torch.Tensor, position_ids: torch.Tensor,
                rotary, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` (lifted), ``next_embeds``: (B, T, H); ``position_ids`` (B, T). Returns
        the predicted features (B, T, H) of the next positions (causal over T)."""
        x = self.fc(torch.cat([features, next_embeds], dim=-1))
        b, t, _ = x.shape
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None].expand(b, t, t)
        if pad_mask is not None:
            allowed = allowed & pad_mask.bool()[:, None, :]
            allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)[None]  # no empty rows
        return self._attend(x, allowed, position_ids, rotary)

    def extend(self, features: torch.Tensor, next_embeds: torch.Tensor, position_ids: torch.Tensor, rotary,
               cache) -> torch.Tensor:
        """:meth:`forward` for new positions after those in ``cache`` (a one-layer cache the
        call extends): ``features`` (lifted), ``next_embeds`` (1, T, H) at ``position_ids`` (1, T)."""
        x = self.fc(torch.cat([features, next_embeds], dim=-1))
        t, past = x.shape[1], cache.get_seq_length()
        allowed = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)[None]
        return self._attend(x, allowed, position_ids, rotary, cache)

    def _attend(self, x: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor, rotary,
                cache=None) -> torch.Tensor:
        """The decoder layer and norm over ``x`` (B, T, H); ``allowed`` (B, T, S) says which
        of the S keys (cached, then these T) each position may attend to."""
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)
        out = self.layer(x, attention_mask=mask[:, None], position_ids=position_ids, cache=cache,
                         use_cache=cache is not None, position_embeddings=rotary(x, position_ids))
        out = out[0] if isinstance(out, tuple) else out
        return self.norm(out)


def check_taps(taps, n_layers: int) -> None:
    if any(not 1 <= t < n_layers for t in taps):
        raise InputError(f"draft head taps must lie in 1..{n_layers - 1} (the outputs of this model's "
                         f"{n_layers} layers before the last), got {tuple(taps)}")


def save_head(head: DraftHead, folder: str | Path, meta: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    (folder / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta, "shapes": shapes}, indent=2))
    return folder


def load_head(folder: str | Path, lm) -> tuple[DraftHead, dict]:
    """The head in ``folder`` for the target ``lm``; clear errors for a head made for another
    target, or files that do not match their metadata."""
    folder = Path(folder)
    if not (folder / WEIGHTS).exists() or not (folder / META).exists():
        raise InputError(f"no draft head at {folder}: expected {WEIGHTS} and {META}; "
                         f"train one with `rootdefense draft train --model {lm.model_id}`")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"draft head metadata {folder / META} cannot be read: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{folder / META} is not a rootdefense draft head (format {FORMAT_VERSION})")
    if meta.get("model_id") != lm.model_id or meta.get("hidden_size") != lm.hidden_size \
            or meta.get("vocab_size") != int(lm.model.get_output_embeddings().weight.shape[0]):
        raise InputError(f"the draft head at {folder} was trained for model '{meta.get('model_id')}' (hidden "
                         f"{meta.get('hidden_size')}, vocab {meta.get('vocab_size')}), not for '{lm.model_id}' "
                         f"(hidden {lm.hidden_size}); train one for this model with `rootdefense draft train`")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as exc:
        raise InputError(f"draft head weights {folder / WEIGHTS} cannot be read: {exc}") from exc
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != meta.get("shapes"):
        raise InputError(f"draft head weights in {folder} do not match its metadata (tensors or shapes differ); "
                         "the files come from different trainings: retrain it")
    try:
        head = DraftHead(lm.model, tensors["vocab_ids"], taps=tuple((meta.get("spec") or {}).get("taps") or ()))
        head.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"draft head in {folder} does not fit this model's layer: {exc}") from exc
    head = head.to(device=lm.device, dtype=lm.dtype).eval()
    kernels.install(head)  # as the target's layers (models/kernels.py)
    return head, meta
