"""Collect hidden states for probe training: at the last prompt token (query probes) or at
answer tokens (response-position probes), in length-sorted left-padded batches."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.chat import encode_chat, normalize_messages


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(seqs), longest), padded on the left."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    return ids, mask


def _batched_hidden(lm, sequences: list[list[int]], select, layers: list[int], batch_size: int,
                    desc: str) -> list[torch.Tensor]:
    """Run each token sequence; ``select(i, seq_len)`` gives the positions to keep for
    sequence i. Returns per sequence a tensor (positions, len(layers), hidden)."""
    model = lm.model
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list[torch.Tensor | None] = [None] * len(sequences)
    with torch.no_grad(), tqdm(total=len(sequences), desc=desc, unit="seq", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = left_pad([sequences[i] for i in idx], pad)
            width = ids.shape[1]
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                        position_ids=pos.to(lm.device), output_hidden_states=True, logits_to_keep=1)
            for r, i in enumerate(idx):
                offset = width - len(sequences[i])
                keep = torch.tensor(select(i, len(sequences[i])), device=lm.device) + offset
                results[i] = torch.stack([out.hidden_states[layer][r, keep] for layer in layers], dim=1).float().cpu()
            bar.update(len(idx))
    return results  # type: ignore[return-value]


def prompt_ids(lm, prompt: str, prefill: str = "") -> list[int]:
    ids = encode_chat(lm.tokenizer, normalize_messages(prompt), prefill=prefill)
    return ids[0].tolist()


def query_features(lm, prompts: list[str], layers: list[int], batch_size: int = 16) -> torch.Tensor:
    """(N, len(layers), hidden): the state at the last prompt token (the assistant-turn
    opening), the position where the paper's probe reads."""
    seqs = [prompt_ids(lm, p) for p in prompts]
    out = _batched_hidden(lm, seqs, lambda i, n: [n - 1], layers, batch_size, "query states")
    return torch.cat(out, 0)


def answer_positions(n_prompt: int, n_total: int, max_tokens: int, per_answer: int) -> list[int]:
    """Up to ``per_answer`` positions spread over the first ``max_tokens`` answer tokens,
    always including the first (where a refusal or a compliance begins)."""
    last = min(n_total, n_prompt + max_tokens)
    span = list(range(n_prompt, last))
    if len(span) <= per_answer:
        return span
    step = (len(span) - 1) / (per_answer - 1)
    return sorted({span[round(k * step)] for k in range(per_answer)})


def response_features(lm, pairs: list[tuple[str, str]], layers: list[int], max_tokens: int = 48,
                      per_answer: int = 8, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """States at answer tokens of (prompt, answer) pairs. Returns (features (M, L, H),
    owner (M,)) where owner[k] is the pair index the k-th row came from."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        head = prompt_ids(lm, prompt)
        ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"][: max_tokens]
        seqs.append(head + ans)
        starts.append(len(head))
    out = _batched_hidden(lm, seqs, lambda i, n: answer_positions(starts[i], n, max_tokens, per_answer),
                          layers, batch_size, "answer states")
    owner = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(out)])
    return torch.cat(out, 0), owner


@torch.no_grad()
def self_answers(lm, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """The model's own greedy answers (batched transformers generate, left padding)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else lm.eos_token_ids[0]
    answers: list[str] = [""] * len(prompts)
    seqs = [prompt_ids(lm, p) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="model answers", unit="batch", leave=False):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], pad)
        width = ids.shape[1]
        out = lm.model.generate(ids.to(lm.device), attention_mask=mask.to(lm.device), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad)
        for r, i in enumerate(idx):
            answers[i] = tok.decode(out[r, width:], skip_special_tokens=True).strip()
    return answers
