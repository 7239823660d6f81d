"""Turn a prompt or a message list into token ids with the model's own chat template."""

from __future__ import annotations

import torch

from ..errors import InputError, ModelError

ROLES = ("system", "user", "assistant")


def normalize_messages(prompt: str | None = None, messages: list | None = None) -> list[dict]:
    """Validate a single prompt or an OpenAI-style message list; return a message list."""
    if messages is None:
        if prompt is None or not str(prompt).strip():
            raise InputError("empty prompt: give a non-empty prompt or a messages list")
        return [{"role": "user", "content": str(prompt)}]
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InputError(f"message {i} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise InputError(f"message {i} has role '{msg['role']}'; expected one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise InputError(f"message {i} content must be a string")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise InputError("messages hold no non-empty user message")
    return out


def encode_chat(tokenizer, messages: list[dict], max_context: int | None = None,
                reserve: int = 0, prefill: str = "") -> torch.Tensor:
    """Token ids (1, T) of the conversation followed by the assistant-turn opening.

    ``prefill`` is text placed at the start of the assistant answer (used by attacks and by
    the response-position probe). ``reserve`` new tokens must still fit in ``max_context``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "this model's tokenizer has no chat template; rootdefense defends chat models "
            "(use an instruction-tuned model, or set tokenizer.chat_template)"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text += prefill
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if max_context is not None and ids.shape[1] + reserve > max_context:
        raise InputError(
            f"prompt is {ids.shape[1]} tokens; with {reserve} new tokens it exceeds the model's "
            f"context window of {max_context} tokens"
        )
    return ids
