"""Exact candidate scoring and plain-decoding equivalence across model families, on tiny
randomly initialised configs (no download): the decoder must not be Llama-only."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from rootdefense.decoding import Decoder, GenerationConfig
from rootdefense.decoding.candidates import forward_candidates, keep_candidate, prefill
from rootdefense.models import encode_chat, normalize_messages

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4096,
                                                     "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4096}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def build(family, tokenizer):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=tokenizer.eos_token_id,
                                          bos_token_id=tokenizer.bos_token_id, **COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_scoring_and_plain_decoding_are_exact(family, tiny_tokenizer):
    model = build(family, tiny_tokenizer)
    ids = encode_chat(tiny_tokenizer, normalize_messages("How do I bake bread?"))
    L = ids.shape[1]
    # plain decoding equals transformers generate
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                         eos_token_id=None, pad_token_id=0)
    gen = Decoder(model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=12))
    assert gen.token_ids == ref[0, L:].tolist()
    # one-forward candidate scoring equals a full recompute; the kept cache continues exactly
    cache = DynamicCache(config=model.config)
    out = prefill(model, ids, cache)
    cands = torch.topk(out.logits[0], 6).indices
    step = forward_candidates(model, cache, cands, L, layer=2)
    for j in range(6):
        full = model(input_ids=torch.cat([ids, cands[j].view(1, 1)], 1), output_hidden_states=True)
        torch.testing.assert_close(step.hidden[j], full.hidden_states[2][0, -1], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(step.logits[j], full.logits[0, -1], atol=2e-4, rtol=2e-4)
    keep_candidate(cache, L, 6, 4)
    nxt = torch.tensor([[5]])
    a = model(input_ids=nxt, cache=cache, use_cache=True, position_ids=torch.tensor([[L + 1]])).logits[0, -1]
    b = model(input_ids=torch.cat([ids, cands[4].view(1, 1), nxt], 1)).logits[0, -1]
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooked_hidden_state_is_transformers_own(family, tiny_tokenizer):
    """forward_hidden catches hidden_states[layer] with one hook where the module mapping
    holds (checked once per model), else asks transformers for every hidden state; either
    way the tensor is transformers' own, with or without a cache, and no hook is left."""
    from rootdefense.decoding import hidden as H

    model = build(family, tiny_tokenizer)
    ids = encode_chat(tiny_tokenizer, normalize_messages("How do I bake bread?"))
    want = model(input_ids=ids, output_hidden_states=True).hidden_states
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    n = model.config.num_hidden_layers
    for layer in range(n + 1):
        out, got = H.forward_hidden(model, layer, input_ids=ids)
        torch.testing.assert_close(got, want[layer], atol=0, rtol=0)
        torch.testing.assert_close(out.logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        cache = DynamicCache(config=model.config)
        H.forward_hidden(model, layer, input_ids=ids[:, :-1], cache=cache, use_cache=True)
        _, last = H.forward_hidden(model, layer, input_ids=ids[:, -1:], cache=cache, use_cache=True)
        torch.testing.assert_close(last[0, -1], want[layer][0, -1], atol=2e-4, rtol=2e-4)
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    hooked = H._MODULES[model]
    assert all(hooked[i] is not None for i in range(1, n + 1))  # decoder layers and the final norm


def test_a_wrong_module_mapping_falls_back(tiny_tokenizer, monkeypatch):
    from rootdefense.decoding import hidden as H

    model = build("llama", tiny_tokenizer)
    ids = encode_chat(tiny_tokenizer, normalize_messages("hi"))
    monkeypatch.setattr(H, "_candidate_module", lambda m, layer: m.get_decoder().layers[0])  # wrong for layer 2
    _, got = H.forward_hidden(model, 2, input_ids=ids)
    assert H._MODULES[model][2] is None
    torch.testing.assert_close(got, model(input_ids=ids, output_hidden_states=True).hidden_states[2], atol=0, rtol=0)
