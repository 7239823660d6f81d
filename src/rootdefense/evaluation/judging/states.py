"""How a chat model reads an answer: its mean hidden state over the answer's tokens.

A sentence embedding (:mod:`.embedding`) reads an answer as text about a topic; whether a
small model's answer *helps* with the request it was given (starts a plan, names steps,
plays along) might be better read by a chat model that has the request in its context.
:class:`AnswerStates` gives that reading: the chat model's hidden state at one decoder
layer, averaged over the answer's tokens, with the request as the user turn of the chat
template and the answer as the assistant turn. By default the reader is the embedded model
(SmolLM2-135M-Instruct, fp32).

``scripts/judge_reader_check.py`` measures a harm judge over these states against blind
readers (docs/results.md, "The harm judge against readers"): it did not gain enough to
replace the shipped MiniLM judge, which therefore does not use this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import ModelError

READER_MODEL = "smollm2-135m"
READER_LAYER = 24  # of 30
REQUEST_TOKENS = 256  # the request's last tokens
ANSWER_TOKENS = 128  # the answer's first tokens (evaluation answers are 128 tokens)
BATCH = 8


class AnswerStates:
    """Mean hidden state at ``layer`` over the answer tokens of ``chat(request) + answer``."""

    def __init__(self, layer: int = READER_LAYER, request_tokens: int = REQUEST_TOKENS,
                 answer_tokens: int = ANSWER_TOKENS, batch_size: int = BATCH, model=None, tokenizer=None):
        """``model``/``tokenizer``: a chat model to read with (default: the embedded one,
        loaded when it first reads)."""
        if layer < 1 or request_tokens < 1 or answer_tokens < 1 or batch_size < 1:
            raise ModelError(f"bad answer-state settings: layer={layer}, request_tokens={request_tokens}, "
                             f"answer_tokens={answer_tokens}, batch_size={batch_size}")
        self.layer = layer
        self.request_tokens = request_tokens
        self.answer_tokens = answer_tokens
        self.batch_size = batch_size
        self.model, self.tokenizer = model, tokenizer

    def load(self) -> AnswerStates:
        if self.model is None:
            from ...models.loading import load_model

            loaded = load_model(READER_MODEL, dtype="float32", device="cpu")
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
        return self

    def _ids(self, request: str, answer: str) -> tuple[list[int], int]:
        """Token ids of the chat with the answer, and where the answer starts."""
        tok = self.tokenizer
        req = tok(request or "", add_special_tokens=False)["input_ids"][-self.request_tokens:]
        text = tok.apply_chat_template([{"role": "user", "content": tok.decode(req)}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        ans = tok(answer or "", add_special_tokens=False)["input_ids"][:self.answer_tokens]
        if not ans:  # an empty answer is read as the assistant turn's end token
            ans = [tok.eos_token_id]
        return prompt + ans, len(prompt)

    def states(self, requests: Sequence[str], answers: Sequence[str], progress: bool = False,
               desc: str = "reading answers") -> np.ndarray:
        """(n, 576) float32: each answer's mean state at ``layer``."""
        return self.states_at(requests, answers, [self.layer], progress, desc)[:, 0]

    def states_at(self, requests: Sequence[str], answers: Sequence[str], layers: Sequence[int],
                  progress: bool = False, desc: str = "reading answers") -> np.ndarray:
        """(n, len(layers), 576) float32: each answer's mean state at each of ``layers``
        (the output of that decoder layer). Each distinct (request, answer) pair is read
        once, longest first, in batches (right padding: a causal model's states before the
        padding do not see it), and the forward pass stops after the deepest layer asked."""
        import torch
        from tqdm.auto import tqdm

        if len(requests) != len(answers):
            raise ModelError(f"{len(requests)} requests but {len(answers)} answers")
        self.load()
        blocks = self.model.model.layers
        if not layers or min(layers) < 1 or max(layers) >= len(blocks):
            raise ModelError(f"answer-state layers {list(layers)} must lie in 1..{len(blocks) - 1} "
                             f"(the reader has {len(blocks)} layers; the last one's output is normalised)")
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        pairs = list(dict.fromkeys(zip(requests, answers)))
        where = {pair: k for k, pair in enumerate(pairs)}
        encoded = [self._ids(r, a) for r, a in pairs]
        distinct = np.zeros((len(pairs), len(layers), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(pairs)), key=lambda k: -len(encoded[k][0]))
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def keep(layer: int):
            def hook(_module, _inputs, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _Enough
            return hook

        hooks = [blocks[layer - 1].register_forward_hook(keep(layer)) for layer in set(layers)]
        try:
            with torch.inference_mode(), tqdm(total=len(pairs), desc=desc, unit="answer", disable=not progress,
                                               leave=False) as bar:
                for b in range(0, len(order), self.batch_size):
                    idx = order[b:b + self.batch_size]
                    width = max(len(encoded[k][0]) for k in idx)
                    ids = torch.full((len(idx), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(idx), width), dtype=torch.long)
                    answer = torch.zeros((len(idx), width, 1), dtype=torch.float32)
                    for row, k in enumerate(idx):
                        seq, start = encoded[k]
                        ids[row, :len(seq)] = torch.tensor(seq)
                        mask[row, :len(seq)] = 1
                        answer[row, start:len(seq)] = 1.0
                    try:
                        self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _Enough:
                        pass
                    for j, layer in enumerate(layers):
                        pooled = (captured[layer].float() * answer).sum(1) / answer.sum(1)
                        distinct[idx, j] = pooled.numpy()
                    bar.update(len(idx))
        finally:
            for h in hooks:
                h.remove()
        return distinct[[where[pair] for pair in zip(requests, answers)]]


class _Enough(Exception):
    """Raised inside the forward pass once the deepest layer asked for has run."""
