"""A draft head for the target, in the spirit of EAGLE: one decoder layer that reads the
target's own features and predicts its next feature, token by token.

Input at position t is ``[f_t ; e(x_{t+1})]``: the target's final feature at t (the output
of its final norm, what its LM head reads) and the embedding of the token that followed,
mapped to the hidden size by one linear layer; one decoder layer of the target's own kind
(causal attention over a recent window) turns the sequence into predicted features, and the
target's LM head, restricted to a reduced draft vocabulary (the tokens the target used most
in its own answers), turns a predicted feature into a draft token. Embeddings and LM head
are the target's, frozen and never saved with the head. With ``taps`` the head also reads
some inner layers of the target (EAGLE-3's low, middle and high features), fused with the
final feature (:meth:`DraftHead.lift`).

Drafting needs the target's features of the tokens already in the context. The drafter
records them itself, with hooks on the target (its final norm's output, keyed by position
and token id, from every target forward the decoder makes: prefill, verification, candidate
scoring), so any decoder can use it unchanged; features of a context that changed (a
rejected draft, a rollback) are dropped by position.

``rootdefense draft train`` fits a head by distillation from the target: by default, as
EAGLE does, one teacher-forced target forward over each ShareGPT (fit split) prompt +
reference answer gives the target's features and its greedy choice at every position
(:func:`reference_data`); or the target decodes its own answers (:func:`distillation_data`,
slow). The head learns to predict the target's next feature and greedy token (smooth L1 on
features + cross-entropy on tokens).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..decoding.hidden import layer_module
from ..decoding.verify import crop_to
from ..errors import InputError, ModelError
from ..models import kernels
from .base import Drafter

WEIGHTS, META, FORMAT_VERSION = "head.safetensors", "head.json", 1


def _decoder(model):
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
        decoder = _decoder(target)
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


# --------------------------------------------------------------------------- save / load


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


# --------------------------------------------------------------------------- drafting


class HeadDrafter(Drafter):
    """Greedy chains from a :class:`DraftHead`, fed by the target's recorded features.

    The head keeps its own key/value cache: each round it reads only the target features
    that are new since the last round (the tokens just verified) and drafts one token per
    one-position step. Drafted (predicted) entries are dropped from the cache before the
    next round; when the cache spans more than ``2 * window`` positions it is rebuilt from
    the last ``window`` (the head was trained on windows of that order).

    Chains are short by default (``max_k`` 2): on a CPU a verify forward over 4 new tokens
    costs about 1.35x one token against 1.14x for 3 (``rootdefense bench``'s profile), and a
    head whose first guess is right about half the time rarely gets a third token through."""

    name = "draft-head"
    needs_target_features = True  # batched decoders cannot feed it

    def __init__(self, target, head: DraftHead, window: int = 48, max_k: int = 2, start_k: int = 2):
        if not 1 <= start_k <= max_k:
            raise InputError(f"need 1 <= start_k <= max_k, got {start_k} and {max_k}")
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        self.head, self.window, self.max_k, self.start_k = head, window, max_k, start_k
        self.horizon = 2 * window + 64  # how far back features are kept (the cache spans <= 2 * window)
        decoder = _decoder(target)
        self.rotary, self.embed = decoder.rotary_emb, target.get_input_embeddings()
        # the LM head rows of the draft vocabulary, gathered once
        self.lm_rows = target.get_output_embeddings().weight.detach()[head.vocab_ids].to(head.fc.weight.dtype)
        self.features: dict[tuple[int, int], torch.Tensor] = {}  # raw features (taps and final)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tapped: list[torch.Tensor] = []  # this forward's tapped layer outputs, in order
        tapped = [layer_module(target, t) for t in head.taps]  # the same mapping the decoders' probe hooks use
        if None in tapped:
            raise ModelError(f"this model's hidden states {list(head.taps)} cannot all be caught by hooks; "
                             "train a head without --taps for it")
        self._hooks = [decoder.register_forward_pre_hook(self._see_inputs, with_kwargs=True),
                       *(m.register_forward_hook(self._see_tap) for m in tapped),
                       decoder.norm.register_forward_hook(self._see_features)]
        self.reset()

    def _see_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[0] != 1:  # batched steering rows etc.: not this drafter's context
            self._pending = None
            return
        self._tapped = []
        pos = kwargs.get("position_ids")
        if pos is None:
            cache = kwargs.get("cache")
            start = cache.get_seq_length() if cache is not None else 0
            pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        self._pending = (ids[0].detach(), pos[0].detach())

    def _see_tap(self, module, args, output):
        if self._pending is not None:
            self._tapped.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    def _see_features(self, module, args, output):
        if self._pending is None:
            return
        ids, pos = self._pending
        self._pending = None
        feats = output[0].detach()
        if self.head.taps:
            tapped, self._tapped = self._tapped, []
            if len(tapped) != len(self.head.taps):  # a forward that skipped layers: nothing usable
                return
            feats = torch.cat([*tapped, feats], dim=-1)
        keep = pos >= pos.max() - self.horizon  # only recent positions can be asked for
        for p, t, f in zip(pos[keep].tolist(), ids[keep].tolist(), feats[keep], strict=True):
            self.features[(p, t)] = f

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # the interface ------------------------------------------------------------------------

    def reset(self) -> None:
        self.k = self.start_k
        self.features.clear()
        self._restart(0)

    def _restart(self, start: int) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.head.config)
        self._start = start  # the position of the cache's first entry
        self._keys: list[tuple[int, int]] = []  # (token at p, token at p + 1) of the true entries, in order

    def _step(self, feats: torch.Tensor, next_ids: list[int], first: int, raw: bool = True) -> torch.Tensor:
        """Extend the head's cache by positions ``first..`` (features ``feats`` (T, ·): the
        target's raw ones, or ``raw=False`` the head's own prediction, and the tokens after
        them); the predicted feature after the last."""
        dtype, device = self.head.fc.weight.dtype, feats.device
        feats = feats.to(dtype)
        if raw:
            feats = self.head.lift(feats)
        nxt = torch.tensor(next_ids, device=device)
        pos = torch.arange(first, first + len(next_ids), device=device)[None]
        pred = self.head.extend(feats[None], self.embed(nxt)[None].to(dtype), pos, self.rotary, self._cache)
        return pred[0, -1]

    @torch.no_grad()
    def propose(self, context: list[int], k: int) -> list[int]:
        """``context`` ends with the model's own next token (not yet forwarded); every token
        before it has a recorded feature when the decoder forwarded it."""
        k = min(k, self.k)
        n = len(context) - 1  # positions 0..n-1 were forwarded; context[n] is the pending own token
        if k < 1 or n < 1:
            return []
        # keep the cached true entries that still match the context; drop drafted ones
        keep = 0
        for i, (tok, nxt) in enumerate(self._keys):
            p = self._start + i
            if p >= n or context[p] != tok or context[p + 1] != nxt:
                break
            keep += 1
        if keep == 0 or n - self._start > 2 * self.window:
            self._restart(max(0, n - self.window))
        else:
            del self._keys[keep:]
            crop_to(self._cache, keep)
        first = self._start + len(self._keys)
        feats = []
        for p in range(first, n):
            f = self.features.get((p, context[p]))
            if f is None:  # only a gap-free run of features is usable: start again after the gap
                self._restart(p + 1)
                first, feats = p + 1, []
                continue
            feats.append(f)
        if not feats and not self._keys:
            return []
        self._prune(n)
        if feats:
            pred = self._step(torch.stack(feats), context[first + 1:n + 1], first)
            self._keys.extend((context[p], context[p + 1]) for p in range(first, n))
        else:  # nothing new since the last round (the own token was not forwarded yet): redo the last
            last = self.features.get((n - 1, context[n - 1]))
            if last is None:
                self._restart(n)
                return []
            self._keys.pop()
            crop_to(self._cache, len(self._keys))
            pred = self._step(last[None], [context[n]], n - 1)
            self._keys.append((context[n - 1], context[n]))
        draft: list[int] = []
        for i in range(k):
            token = int(self.head.vocab_ids[torch.argmax(pred.to(self.lm_rows.dtype) @ self.lm_rows.T)])
            draft.append(token)
            if i + 1 < k:
                pred = self._step(pred[None], [token], n + i, raw=False)
        return draft

    def _prune(self, n: int) -> None:
        low = n - self.horizon
        if len(self.features) > 4 * self.horizon * 8:
            self.features = {key: v for key, v in self.features.items() if key[0] >= low}

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        if n_proposed:
            self.k = min(self.max_k, self.k + 1) if n_accepted == n_proposed else max(1, self.k - 1)

    def describe(self) -> dict:
        return {"drafter": self.name, "window": self.window, "max_k": self.max_k,
                "draft_vocab": int(self.head.vocab_ids.numel())}


# --------------------------------------------------------------------------- training


@dataclass
class HeadSpec:
    prompts: int = 1500  # ShareGPT conversations (fit split)
    answer_tokens: int = 256
    draft_vocab: int = 8192  # the tokens the target chose most often in the answers
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 8
    window: int = 96  # training sequence length (tokens), ending inside the answer
    feature_weight: float = 1.0
    token_weight: float = 0.1
    gen_batch: int = 16
    seed: int = 0
    schedule: str = "constant"  # learning rate: constant, or cosine (decays to 0 over the epochs)
    # training passes over each window: 1 reads the target's features only; each further pass
    # reads the head's own predicted features of the pass before (shifted one position), as
    # it does from its second drafted token on
    unroll: int = 1
    # extra target layers the head reads, as EAGLE-3 does (low and middle features beside the
    # final one): indices into the model's hidden states (i = the output of decoder layer i - 1)
    taps: tuple[int, ...] = ()

    def __post_init__(self):
        self.taps = tuple(int(t) for t in self.taps)
        if any(t < 1 for t in self.taps) or len(set(self.taps)) != len(self.taps) \
                or list(self.taps) != sorted(self.taps):
            raise InputError(f"draft head taps must be distinct increasing layer indices >= 1, got {self.taps}")
        for name in ("prompts", "answer_tokens", "draft_vocab", "epochs", "batch_size", "window", "gen_batch",
                     "unroll"):
            if getattr(self, name) < 1:
                raise InputError(f"draft head setting '{name}' must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"draft head schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 < self.lr < 1:
            raise InputError(f"lr must lie in (0, 1), got {self.lr}")


@torch.no_grad()
def distillation_data(lm, spec: HeadSpec, prompts: list[str], log=print) -> list[dict]:
    """The target's own greedy answers to ``prompts`` and its features over prompt + answer."""
    from tqdm.auto import tqdm

    from ..decoding import GenerationConfig
    from ..decoding.batched import BatchDecoder
    from ..models import encode_chat

    decoder = BatchDecoder(lm.model, lm.tokenizer, eos_token_ids=lm.eos_token_ids)
    cfg = GenerationConfig(max_new_tokens=spec.answer_tokens)
    rows = []
    for i in tqdm(range(0, len(prompts), spec.gen_batch), desc="draft head: target answers", unit="batch"):
        chunk = prompts[i:i + spec.gen_batch]
        ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}], lm.max_context,
                           reserve=spec.answer_tokens) for p in chunk]
        for p_ids, gen in zip(ids, decoder.generate(ids, cfg), strict=True):
            seq = torch.cat([p_ids[0], torch.tensor(gen.token_ids, dtype=torch.long)])
            rows.append(_features_row(lm, seq, int(p_ids.shape[1]), spec.taps))
    return rows


def _features_row(lm, seq: torch.Tensor, prompt_len: int, taps: tuple[int, ...] = ()) -> dict:
    """One teacher-forced target forward over ``seq``: its features (the hidden states at
    ``taps``, then the final one, concatenated) and, at every position, the token the target
    itself would emit next (its greedy choice)."""
    out = lm.model(input_ids=seq[None].to(lm.device), output_hidden_states=True)
    check_taps(taps, len(out.hidden_states) - 1)
    feats = torch.cat([out.hidden_states[t][0] for t in taps] + [out.hidden_states[-1][0]], dim=-1)
    return {"ids": seq, "features": feats.float().cpu(), "prompt_len": prompt_len,
            "greedy": out.logits[0].argmax(-1).cpu()}


def check_taps(taps, n_layers: int) -> None:
    if any(not 1 <= t < n_layers for t in taps):
        raise InputError(f"draft head taps must lie in 1..{n_layers - 1} (the outputs of this model's "
                         f"{n_layers} layers before the last), got {tuple(taps)}")


@torch.no_grad()
def reference_data(lm, spec: HeadSpec, pairs: list[tuple[str, str]], log=print) -> list[dict]:
    """Teacher-forced distillation data, as EAGLE trains: one target forward over each
    prompt + reference answer (ShareGPT's own), up to ``answer_tokens`` answer tokens. The
    features are the target's and the token targets its greedy choices at each position, so
    the head learns the target, not the reference's author. A forward per answer instead of
    a decode per token: about 50 times more tokens per second than :func:`distillation_data`."""
    from tqdm.auto import tqdm

    from ..models import encode_chat

    rows = []
    for prompt, answer in tqdm(pairs, desc="draft head: target features", unit="answer"):
        p_ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}])
        a_ids = lm.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        a_ids = a_ids[:spec.answer_tokens]
        if a_ids.numel() < 4 or p_ids.shape[1] + a_ids.numel() > lm.max_context:
            continue
        rows.append(_features_row(lm, torch.cat([p_ids[0], a_ids]), int(p_ids.shape[1]), spec.taps))
    return rows


def save_rows(rows: list[dict], path: str | Path, meta: dict) -> Path:
    """Distillation rows (the target's answers and features) as one safetensors file, so a
    head can be retrained (more epochs, another learning rate) without decoding again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([int(r["ids"].shape[0]) for r in rows], dtype=torch.long)
    tensors = {"ids": torch.cat([r["ids"] for r in rows]).long().contiguous(),
               "features": torch.cat([r["features"] for r in rows]).float().contiguous(),
               "lengths": lengths, "prompt_lens": torch.tensor([r["prompt_len"] for r in rows], dtype=torch.long),
               "greedy": torch.cat([r["greedy"] for r in rows]).long().contiguous()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def load_rows(path: str | Path, meta: dict) -> list[dict] | None:
    """Rows saved by :func:`save_rows` when their metadata equals ``meta``; else None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as fh:
        saved = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
        if saved != json.loads(json.dumps(meta)):
            return None
        if "greedy" not in fh.keys():  # noqa: SIM118 (safe_open has no __contains__); saved before greedy targets
            return None
        ids, feats, greedy = fh.get_tensor("ids"), fh.get_tensor("features"), fh.get_tensor("greedy")
        lengths, prompt_lens = fh.get_tensor("lengths").tolist(), fh.get_tensor("prompt_lens").tolist()
    rows, start = [], 0
    for n, p in zip(lengths, prompt_lens, strict=True):
        rows.append({"ids": ids[start:start + n], "features": feats[start:start + n], "prompt_len": int(p),
                     "greedy": greedy[start:start + n]})
        start += n
    return rows


def pick_vocab(rows: list[dict], size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` tokens the target chose most often in its answers (ids sorted)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in rows:
        counts += torch.bincount(r["greedy"][r["prompt_len"] - 1:], minlength=vocab_size)[:vocab_size]
    order = torch.argsort(counts, descending=True)[:min(size, vocab_size)]
    return torch.sort(order).values


def _windows(rows: list[dict], window: int):
    """Training windows: (features, ids, start, loss-from) ending inside each answer."""
    out = []
    for r in rows:
        n = r["ids"].shape[0]
        for end in range(n, r["prompt_len"] + 1, -window // 2):
            start = max(0, end - window)
            out.append((r, start, end))
            if start == 0:
                break
    return out


def train_head(lm, spec: HeadSpec, rows: list[dict], log=print,
               val: list[dict] | None = None, init: DraftHead | None = None) -> tuple[DraftHead, dict]:
    """Fit a head on distillation ``rows``; the acceptance estimate (greedy top-1 agreement
    of chained drafts) is taken on ``val`` (the target's own answers to other prompts), or on
    the last 10% of ``rows`` held out. ``init``: a trained head to start from (its layer;
    the draft vocabulary is picked afresh from ``rows``, since the layer does not depend on it)."""
    torch.manual_seed(spec.seed)
    vocab_size = int(lm.model.get_output_embeddings().weight.shape[0])
    if val is None:
        n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
        fit, val = rows[:len(rows) - n_val], rows[len(rows) - n_val:]
    else:
        fit = rows
    head = DraftHead(lm.model, pick_vocab(fit, spec.draft_vocab, vocab_size), taps=spec.taps)
    if init is not None:
        if init.taps and init.taps != head.taps:
            raise InputError(f"the head to start from reads layers {init.taps}, not {head.taps}")
        result = head.load_state_dict({k: v for k, v in init.state_dict().items() if k != "vocab_ids"},
                                      strict=False)
        # a head without taps starts a tapped one: its fusion keeps the "final feature" start
        new_parts = {k for k in head.state_dict() if k.startswith(("fuse.", "tap_norms."))}
        may_miss = {"vocab_ids"} | (new_parts if head.taps and not init.taps else set())
        if result.unexpected_keys or not {"vocab_ids"} <= set(result.missing_keys) <= may_miss:
            raise InputError(f"the head to start from does not fit this model's layer: {result}")
    head = head.to(lm.device).float().train()
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[head.vocab_ids] = torch.arange(head.vocab_ids.numel())
    decoder = _decoder(lm.model)
    embed = lm.model.get_input_embeddings()
    weight = lm.model.get_output_embeddings().weight.detach().float()[head.vocab_ids.to(lm.device)]
    opt = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=0.0)
    batches = _windows(fit, spec.window)
    t0, history = time.perf_counter(), []
    steps, step = spec.epochs * -(-len(batches) // spec.batch_size), 0
    from tqdm.auto import tqdm

    for epoch in range(spec.epochs):
        order = torch.randperm(len(batches)).tolist()
        total, count = 0.0, 0
        for i in tqdm(range(0, len(order), spec.batch_size), desc=f"draft head: epoch {epoch + 1}/{spec.epochs}",
                      unit="batch", leave=False):
            if spec.schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            step += 1
            loss = _batch_loss(head, [batches[j] for j in order[i:i + spec.batch_size]], embed, decoder.rotary_emb,
                               weight, remap, spec, lm.device)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            total, count = total + float(loss.detach()), count + 1
        history.append(round(total / max(1, count), 4))
        log(f"draft head epoch {epoch + 1}/{spec.epochs}: loss {history[-1]}")
    head.eval()
    metrics = {"loss": history, "seconds": round(time.perf_counter() - t0, 1), "fit_answers": len(fit),
               "val_answers": len(val), "fit_tokens": int(sum(r["ids"].shape[0] - r["prompt_len"] for r in fit)),
               **_acceptance(head, val, embed, decoder.rotary_emb, weight, lm)}
    return head, metrics


def _batch_loss(head, items, embed, rotary, weight, remap, spec: HeadSpec, device) -> torch.Tensor:
    width = max(end - start for _, start, end in items) - 1
    b = len(items)
    h = weight.shape[1]
    feats = torch.zeros(b, width, head.raw_size)
    nxt = torch.zeros(b, width, dtype=torch.long)
    tgt_f = torch.zeros(b, width, h)
    tgt_t = torch.full((b, width), -100, dtype=torch.long)
    pad = torch.zeros(b, width, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    for i, (r, start, end) in enumerate(items):
        n = end - start - 1  # inputs at positions start..end-2 predict start+1..end-1
        feats[i, :n] = r["features"][start:end - 1]
        nxt[i, :n] = r["ids"][start + 1:end]
        tgt_f[i, :n] = r["features"][start + 1:end, -h:]  # the final feature (what the LM head reads)
        # the token the target emits after each predicted position (its greedy choice)
        after = remap[r["greedy"][start + 1:end]].clone()
        after[: max(0, r["prompt_len"] - 1 - start)] = -100  # learn to draft answers, not prompts
        tgt_t[i, :n] = after
        pad[i, :n] = 1
        pos[i, :n] = torch.arange(start, end - 1)
    feats, nxt, tgt_f, tgt_t, pad, pos = (x.to(device) for x in (feats, nxt, tgt_f, tgt_t, pad, pos))
    with torch.no_grad():
        emb = embed(nxt).float()
    m = pad.bool()

    def pass_loss(pred: torch.Tensor) -> torch.Tensor:
        f_loss = torch.nn.functional.smooth_l1_loss(pred[m], tgt_f[m])
        logits = pred @ weight.T
        t_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_t.reshape(-1),
                                                   ignore_index=-100)
        return spec.feature_weight * f_loss + spec.token_weight * t_loss

    feats = head.lift(feats)
    pred = head(feats, emb, pos, rotary, pad_mask=pad)
    loss = pass_loss(pred)
    for _ in range(1, spec.unroll):  # the head's own predictions of the pass before stand in for the target's features
        feats = torch.cat([feats[:, :1], pred[:, :-1].detach()], dim=1)
        pred = head(feats, emb, pos, rotary, pad_mask=pad)
        loss = loss + pass_loss(pred)
    return loss / spec.unroll


@torch.no_grad()
def chain_marks(head, val, embed, rotary, weight, device, k: int, stride: int) -> list[list[bool]]:
    """On held-out answers, every ``stride``-th answer position: the head drafts a greedy
    chain of up to ``k`` tokens from the target's features (its own predicted features from
    the second token on, as when drafting); per position, whether drafts 1..k are still on
    the target's own greedy path (prefix-closed: False from the first miss on)."""
    out = []
    for r in val:
        ids, feats, p0 = r["ids"], r["features"].to(device), r["prompt_len"]
        for t in range(p0, ids.shape[0] - k - 1, stride):
            start = max(0, t - 24)
            f = head.lift(feats[start:t][None])
            nxt = ids[start + 1:t + 1].to(device)
            marks = [False] * k
            for step in range(k):
                pos = torch.arange(start, start + f.shape[1], device=device)[None]
                pred = head(f, embed(nxt)[None].float(), pos, rotary)
                tok = int(head.vocab_ids[torch.argmax(pred[0, -1] @ weight.T)])  # weight: the draft vocab's rows
                want = int(r["greedy"][t + step])  # the target's own next token
                if tok != want:
                    break
                marks[step] = True
                if int(ids[t + 1 + step]) != want:  # the text leaves the target's own path
                    break
                f = torch.cat([f, pred[:, -1:]], dim=1)
                nxt = torch.cat([nxt, ids[t + 1 + step:t + 2 + step].to(device)])
            out.append(marks)
    return out


def _acceptance(head, val, embed, rotary, weight, lm, k: int = 4) -> dict:
    """On held-out answers: how often the head's greedy draft equals the target's next
    token, one step (teacher-forced) and chained (expected tokens accepted of ``k``)."""
    marks = chain_marks(head, val, embed, rotary, weight, lm.device, k, stride=8)
    return {"val_top1": round(sum(m[0] for m in marks) / max(1, len(marks)), 4),
            f"val_mean_accepted_of_{k}": round(sum(sum(m) for m in marks) / max(1, len(marks)), 3)}


DATA_SOURCES = {"self": "sharegpt (fit split) prompts, the target's own greedy answers",
                "reference": "sharegpt (fit split) prompts and reference answers, teacher-forced through the target; "
                             "token targets are the target's greedy choices"}


def tap_tag(taps) -> str:
    """What a distillation file's name adds for tapped features ("" without taps), so data
    with other layers' features is kept apart from (never mixed with) final-only data."""
    return f"taps{'.'.join(map(str, taps))}-" if taps else ""


def tap_note(taps) -> str:
    """What a data source description adds for tapped features ("" without taps)."""
    return f", features of hidden states {list(taps)} and the final one" if taps else ""


def head_meta(lm, spec: HeadSpec, metrics: dict, n_prompts: int, source: str = "self") -> dict:
    return {"model_id": lm.model_id, "hidden_size": lm.hidden_size,
            "vocab_size": int(lm.model.get_output_embeddings().weight.shape[0]), "spec": asdict(spec),
            "data": {"source": DATA_SOURCES[source] + tap_note(spec.taps), "prompts": n_prompts}, "train": metrics}
