"""Fitting a draft head by distillation from the target: it learns to predict the
target's next feature and greedy token (smooth L1 on features + cross-entropy on tokens),
and its acceptance is measured on held-out answers."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ...errors import InputError
from ...paths import head_dir
from .data import (
    DATA_SOURCES,
    distillation_data,
    reference_data,
    saved_rows,
    tap_note,
    tap_tag,
)
from .network import DraftHead, check_taps, load_head, save_head, target_decoder
from .spec import HeadSpec


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
    decoder = target_decoder(lm.model)
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


def head_meta(lm, spec: HeadSpec, metrics: dict, n_prompts: int, source: str = "self") -> dict:
    return {"model_id": lm.model_id, "hidden_size": lm.hidden_size,
            "vocab_size": int(lm.model.get_output_embeddings().weight.shape[0]), "spec": asdict(spec),
            "data": {"source": DATA_SOURCES[source] + tap_note(spec.taps), "prompts": n_prompts}, "train": metrics}


def train_from_sharegpt(lm, spec: HeadSpec, source: str = "reference", val_prompts: int = 24, folder=None,
                        init_from=None, fresh_data: bool = False, log=print) -> tuple[Path, dict, int]:
    """``rootdefense draft train``: a head for ``lm`` fitted on ShareGPT's fit split and saved
    in ``folder`` (default: the model's draft-head cache); returns (folder, metrics, prompts).

    ``source`` "reference": teacher-forced features over the reference answers, with the
    acceptance measured on the model's own answers to ``val_prompts`` val-split prompts;
    "self": the model's own answers (slow). The data is saved beside the head and reused (or
    extended) by a later training unless ``fresh_data``. ``init_from``: a trained head to
    start from."""
    from ...data.loaders import load_dataset
    from ...data.split import split_of

    if val_prompts < 1:
        raise InputError(f"val_prompts must be positive, got {val_prompts}")
    check_taps(spec.taps, lm.num_layers)
    tag, note = tap_tag(spec.taps), tap_note(spec.taps)
    folder = Path(folder or head_dir(lm.model_id))
    init, init_meta = load_head(init_from, lm) if init_from else (None, None)  # checked before any data is made
    sharegpt = load_dataset("sharegpt")
    fit = [e for e in sharegpt if split_of(e.prompt) == "fit"][:spec.prompts]
    t0 = time.perf_counter()
    if source == "reference":
        rows, made = saved_rows(folder, f"ref-{tag}", lm, len(fit), spec.answer_tokens,
                                "sharegpt fit split, reference answers, teacher-forced" + note,
                                lambda start: reference_data(lm, spec, [(e.prompt, e.answer) for e in fit[start:]]),
                                fresh_data, log)
        held = [e.prompt for e in sharegpt if split_of(e.prompt) == "val"][:val_prompts]
        val_spec = HeadSpec(prompts=len(held), answer_tokens=min(spec.answer_tokens, 128), taps=spec.taps)
        val, _ = saved_rows(folder, f"val-{tag}", lm, len(held), val_spec.answer_tokens,
                            "sharegpt val split, the target's greedy answers" + note,
                            lambda start: distillation_data(lm, val_spec, held[start:]), fresh_data, log)
    elif source == "self":
        texts = [e.prompt for e in fit]
        rows, made = saved_rows(folder, tag, lm, len(texts), spec.answer_tokens,
                                "sharegpt fit split, the target's greedy answers" + note,
                                lambda start: distillation_data(lm, spec, texts[start:], log=log), fresh_data, log)
        val = None
    else:
        raise InputError(f"draft head data source must be one of {', '.join(DATA_SOURCES)}, got {source!r}")
    head, metrics = train_head(lm, spec, rows, log=log, val=val, init=init)
    metrics["data_seconds"] = round(time.perf_counter() - t0, 1) if made else None
    if init_meta is not None:  # what the starting head was, so the recipe stays traceable
        metrics["init"] = {"spec": init_meta.get("spec"), "data": init_meta.get("data"), "train": init_meta.get("train")}
    return save_head(head, folder, head_meta(lm, spec, metrics, len(fit), source)), metrics, len(fit)
