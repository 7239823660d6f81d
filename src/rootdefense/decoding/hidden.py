"""One layer's hidden state from a forward, caught by a hook.

The decoders read one hidden state per forward: the probe's layer. ``output_hidden_states=True``
makes transformers keep every layer's. A forward hook on the one module whose output is
``hidden_states[layer]`` (the token embeddings for 0, decoder layer ``i - 1`` for ``i``, the
final norm for the last) does only that. The saving is small: on the embedded model, after
300 tokens, interleaved medians gave 2.2 ms of a 57 ms one-token forward in one timing and
0.2 ms of 64 ms (0.7 ms of 78 ms for 3 tokens) in another.

That mapping holds for Llama-style decoders but not for every architecture (some scale or
mix the embeddings before the first layer), so it is checked once per model and layer
against ``output_hidden_states`` on a two-token input; where the hooked output is not the
same tensor, the forward asks for every hidden state as before.
"""

from __future__ import annotations

import weakref

import torch

_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer: module or None}


def _candidate_module(model, layer: int):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None:
        return None
    n = len(layers)
    if layer == 0:
        return getattr(decoder, "embed_tokens", None)
    if 1 <= layer < n:
        return layers[layer - 1]
    if layer == n:
        return getattr(decoder, "norm", None)
    return None


def _catch(module, caught: list):
    return module.register_forward_hook(
        lambda _m, _args, out: caught.append(out[0] if isinstance(out, tuple) else out))


@torch.no_grad()
def layer_module(model, layer: int):
    """The module whose output is ``hidden_states[layer]`` for this model, checked once
    against transformers' own hidden states; None where no hook gives the same tensor."""
    per_model = _MODULES.setdefault(model, {})
    if layer in per_model:
        return per_model[layer]
    module = _candidate_module(model, layer)
    if module is not None:
        caught: list = []
        handle = _catch(module, caught)
        try:
            device = next(model.parameters()).device
            out = model(input_ids=torch.tensor([[1, 2]], device=device), output_hidden_states=True)
            want = out.hidden_states[layer]
            if len(caught) != 1 or not torch.is_tensor(caught[0]) or caught[0].shape != want.shape \
                    or not torch.equal(caught[0], want):
                module = None
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):  # keeps the transformers path
            module = None
        finally:
            handle.remove()
    per_model[layer] = module
    return module


def forward_hidden(model, layer: int | None, runner=None, **kwargs):
    """``model(**kwargs)`` and its ``hidden_states[layer]`` (None when ``layer`` is None).
    ``runner``: what runs the forward instead of ``model`` itself (a peft wrapper of it
    with per-row adapters); the layer is still looked up on ``model``."""
    if layer is None:
        return (runner or model)(**kwargs), None
    out, (hidden,) = forward_layers(model, [layer], runner, **kwargs)
    return out, hidden


def forward_layers(model, layers: list[int], runner=None, **kwargs):
    """``model(**kwargs)`` and its ``hidden_states[l]`` for each of ``layers``, in order."""
    run = runner or model
    modules = {layer: layer_module(model, layer) for layer in layers}
    if any(m is None for m in modules.values()):
        out = run(**kwargs, output_hidden_states=True)
        return out, [out.hidden_states[layer] for layer in layers]
    caught: dict[int, list] = {layer: [] for layer in modules}
    handles = [_catch(module, caught[layer]) for layer, module in modules.items()]
    try:
        out = run(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, [caught[layer][-1] for layer in layers]
