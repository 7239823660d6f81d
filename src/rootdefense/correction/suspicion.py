"""How unreadable a request is to the model itself: the suspicion behind ``suspect_nll``.

An optimised adversarial suffix (GCG and its probe-aware variant) is a run of tokens no
writer would put together; the model's own surprisal over it is far above that of any
sentence a user writes. The suspicion of a request is the highest mean surprisal (in nats)
over ``window`` consecutive tokens of its content (the chat template's own tokens left out).
"""

from __future__ import annotations

import torch


def template_span(tokenizer) -> tuple[int, int]:
    """How many tokens the chat template puts before and after a one-message request's
    content; (0, 0) without a tokenizer or a chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return 0, 0
    from ..models.chat import encode_chat

    a, b = (encode_chat(tokenizer, [{"role": "user", "content": c}])[0].tolist() for c in ("apple", "Zebra crossing 42"))
    pre = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    post = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y), 0)
    return pre, min(post, min(len(a), len(b)) - pre)


def suspicion(surprisal, span: tuple[int, int], window: int) -> float:
    """The highest mean of ``window`` consecutive content surprisals; 0 for a request of
    fewer content tokens (a short message such as "hi" or "codes please" is surprising as a
    whole, and holds no span to hide a suffix in). ``surprisal[j]`` is -log p of prompt token
    j + 1, for the request's tokens; ``span`` is :func:`template_span`."""
    pre, post = span
    x = [float(v) for v in surprisal][max(pre - 1, 0): max(len(surprisal) - post, 0)]
    if len(x) < window:
        return 0.0
    run = best = sum(x[:window])
    for i in range(window, len(x)):
        run += x[i] - x[i - window]
        best = max(best, run)
    return best / window


def token_surprisal(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """-log p of each target token under the logits (T, V) of the position before it."""
    logits = logits.float()
    target = torch.tensor(targets, device=logits.device)
    return (torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]).tolist()


@torch.no_grad()
def prompt_surprisal(model, ids: list[int]) -> list[float]:
    """-log p of tokens 1 .. len(ids) - 1 from one full forward (offline; the engine takes
    the same numbers from its prefill)."""
    return token_surprisal(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1], ids[1:])
