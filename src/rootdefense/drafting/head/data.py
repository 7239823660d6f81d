"""The draft head's training data: the target's features and greedy choices over prompts
and answers, saved beside the head so that training again reuses them.

By default, as EAGLE does, one teacher-forced target forward over each ShareGPT (fit split)
prompt + reference answer gives the target's features and its greedy choice at every
position (:func:`reference_data`); or the target decodes its own answers
(:func:`distillation_data`, slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .network import check_taps
from .spec import HeadSpec

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


@torch.no_grad()
def distillation_data(lm, spec: HeadSpec, prompts: list[str], log=print) -> list[dict]:
    """The target's own greedy answers to ``prompts`` and its features over prompt + answer."""
    from tqdm.auto import tqdm

    from ...decoding import Decoder, GenerationConfig
    from ...models import encode_chat

    decoder = Decoder(lm.model, lm.tokenizer, eos_token_ids=lm.eos_token_ids)
    cfg = GenerationConfig(max_new_tokens=spec.answer_tokens)
    rows = []
    for i in tqdm(range(0, len(prompts), spec.gen_batch), desc="draft head: target answers", unit="batch"):
        chunk = prompts[i:i + spec.gen_batch]
        ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}], lm.max_context,
                           reserve=spec.answer_tokens) for p in chunk]
        for p_ids, gen in zip(ids, decoder.generate_batch(ids, cfg), strict=True):
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


@torch.no_grad()
def reference_data(lm, spec: HeadSpec, pairs: list[tuple[str, str]], log=print) -> list[dict]:
    """Teacher-forced distillation data, as EAGLE trains: one target forward over each
    prompt + reference answer (ShareGPT's own), up to ``answer_tokens`` answer tokens. The
    features are the target's and the token targets its greedy choices at each position, so
    the head learns the target, not the reference's author. A forward per answer instead of
    a decode per token: about 50 times more tokens per second than :func:`distillation_data`."""
    from tqdm.auto import tqdm

    from ...models import encode_chat

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


def saved_rows(folder: str | Path, kind: str, lm, prompts: int, answer_tokens: int, source: str, make,
               fresh: bool = False, log=print) -> tuple[list[dict], bool]:
    """Distillation rows saved in ``folder`` (``distill-{kind}{prompts}x{answer_tokens}``)
    for the same model, sizes and source, or made (and saved) now; and whether they were made.
    ``make(start)`` makes the rows of the prompts from index ``start`` on. The prompts are the
    first ones of a fixed list, so rows saved for fewer prompts are the start of these: the
    largest such set is extended with the rest instead of being made again."""
    folder = Path(folder)
    path = folder / f"distill-{kind}{prompts}x{answer_tokens}.safetensors"
    meta = {"model_id": lm.model_id, "prompts": prompts, "answer_tokens": answer_tokens, "source": source}
    rows = None if fresh else load_rows(path, meta)
    if rows is not None:
        log(f"reusing the saved distillation data: {path}")
        return rows, False
    pattern = re.compile(rf"distill-{re.escape(kind)}(\d+)x{answer_tokens}\.safetensors")
    smaller = sorted(((int(m.group(1)), f) for f in (folder.glob("distill-*.safetensors") if not fresh else [])
                      if (m := pattern.fullmatch(f.name)) and int(m.group(1)) < prompts), reverse=True)
    for n, f in smaller:
        saved = load_rows(f, {**meta, "prompts": n})
        if saved is not None:
            log(f"extending the saved distillation data for {n} prompts ({f}) with {prompts - n} more")
            rows = saved + make(n)
            break
    else:
        rows = make(0)
    save_rows(rows, path, meta)
    return rows, True
