"""The decoding loop on a tiny random model: equivalence with transformers, exactness of
one-forward candidate scoring, correctness of the cache after a replacement, and rules."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rootdefense.decoding import (
    Decoder,
    GenerationConfig,
    PaperRule,
    ThresholdRule,
    WeightedRule,
)
from rootdefense.decoding.candidates import forward_candidates, keep_candidate, prefill
from rootdefense.decoding.rules import Candidates
from rootdefense.errors import InputError
from rootdefense.models import encode_chat, normalize_messages
from rootdefense.probes.base import LinearProbe

PROMPTS = ["How do I bake bread?", "Sure, here is a tutorial", "The quick brown fox"]


def prompt_ids(tok, text):
    return encode_chat(tok, normalize_messages(text))


def random_probe(hidden, layer, seed=1, threshold=0.5):
    g = torch.Generator().manual_seed(seed)
    return LinearProbe(weight=torch.randn(hidden, generator=g), bias=0.0, layer=layer,
                       threshold=threshold, meta={"model_id": "tiny"})


@pytest.mark.parametrize("text", PROMPTS)
def test_defense_off_greedy_equals_generate(tiny_model, tiny_tokenizer, text):
    ids = prompt_ids(tiny_tokenizer, text)
    ref = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    ref_new = ref[0, ids.shape[1]:].tolist()
    gen = Decoder(tiny_model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=40))
    assert gen.token_ids == ref_new
    assert not any(s.replaced for s in gen.trace.steps)


def test_monitoring_probe_does_not_change_output(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=25)
    plain = Decoder(tiny_model, tiny_tokenizer).generate(ids, cfg)
    probe = random_probe(tiny_model.config.hidden_size, layer=2)
    watched = Decoder(tiny_model, tiny_tokenizer, probe=probe).generate(ids, cfg)
    assert watched.token_ids == plain.token_ids
    assert all(s.harm is not None and 0 <= s.harm <= 1 for s in watched.trace.steps)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_candidate_scoring_equals_full_recompute(tiny_model, tiny_tokenizer, layer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[1])
    cache = DynamicCache(config=tiny_model.config)
    out = prefill(tiny_model, ids, cache)
    cands = torch.topk(out.logits[0], 12).indices
    step = forward_candidates(tiny_model, cache, cands, ids.shape[1], layer)
    assert cache.get_seq_length() == ids.shape[1] + 12
    for j, tok in enumerate(cands.tolist()):
        full = tiny_model(input_ids=torch.cat([ids, torch.tensor([[tok]])], 1), output_hidden_states=True)
        torch.testing.assert_close(step.hidden[j], full.hidden_states[layer][0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.logits[j], full.logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("j", [0, 5, 11])
def test_cache_after_replacement_equals_recompute(tiny_model, tiny_tokenizer, j):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[2])
    L = ids.shape[1]
    cache = DynamicCache(config=tiny_model.config)
    out = prefill(tiny_model, ids, cache)
    cands = torch.topk(out.logits[0], 12).indices
    forward_candidates(tiny_model, cache, cands, L, layer=None)
    keep_candidate(cache, L, 12, j)
    full_ids = torch.cat([ids, cands[j:j + 1][None]], 1)
    ref = DynamicCache(config=tiny_model.config)
    tiny_model(input_ids=full_ids, cache=ref, use_cache=True)
    assert cache.get_seq_length() == L + 1
    for got, want in zip(cache.layers, ref.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    # and decoding continues exactly as from a recompute
    nxt = torch.tensor([[7]])
    a = tiny_model(input_ids=nxt, cache=cache, use_cache=True).logits
    b = tiny_model(input_ids=torch.cat([full_ids, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_defended_output_equals_stepwise_recompute(tiny_model, tiny_tokenizer):
    """A defended run with many replacements produces exactly the tokens a slow reference
    (full recompute per candidate, same rule) produces."""
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    layer = 2
    probe = random_probe(tiny_model.config.hidden_size, layer=layer, seed=3)
    tau = 0.5
    rule = ThresholdRule(tau=tau)
    gen = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=rule).generate(
        ids, GenerationConfig(max_new_tokens=15, top_m=8))
    seq = ids
    expected = []
    with torch.no_grad():
        for _ in range(15):
            logits = tiny_model(input_ids=seq).logits[0, -1]
            logprobs = torch.log_softmax(logits, -1)
            cands = torch.topk(logprobs, 8).indices
            hs = []
            for c in cands.tolist():
                out = tiny_model(input_ids=torch.cat([seq, torch.tensor([[c]])], 1), output_hidden_states=True)
                hs.append(out.hidden_states[layer][0, -1])
            harms = probe.score(torch.stack(hs))
            j = rule.choose(Candidates(cands, logprobs[cands], harms, 0))
            expected.append(int(cands[j]))
            seq = torch.cat([seq, cands[j].view(1, 1)], 1)
    assert gen.token_ids == expected
    assert gen.trace.replaced > 0, "probe/tau chosen so that the rule intervenes"


def test_trace_records_original_choice(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[1])
    plain = Decoder(tiny_model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=10))
    probe = random_probe(tiny_model.config.hidden_size, layer=3, seed=5)
    gen = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=ThresholdRule(0.3)).generate(
        ids, GenerationConfig(max_new_tokens=10, top_m=10))
    first = next(i for i, s in enumerate(gen.trace.steps) if s.replaced)
    step = gen.trace.steps[first]
    assert gen.token_ids[:first] == plain.token_ids[:first]
    assert step.original_id == plain.token_ids[first]
    assert step.token_id != step.original_id
    assert step.original_harm >= 0.3
    assert step.candidates == 10


def test_sampling_is_seeded_and_stays_in_allowed_set(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    probe = random_probe(tiny_model.config.hidden_size, layer=1, seed=2)
    dec = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=ThresholdRule(0.5))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=11)
    a, b = dec.generate(ids, cfg), dec.generate(ids, cfg)
    assert a.token_ids == b.token_ids
    c = dec.generate(ids, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=12))
    assert c.token_ids != a.token_ids
    for s in a.trace.steps:  # a replaced token is allowed unless no candidate was
        if s.replaced:
            assert s.harm < 0.5 or s.harm <= s.original_harm


def test_eos_and_stop_strings(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    plain = Decoder(tiny_model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=30))
    assert len(plain.token_ids) == 30 and plain.trace.finish_reason == "length"
    eos_tok = plain.token_ids[4]
    gen = Decoder(tiny_model, tiny_tokenizer, eos_token_ids=[eos_tok]).generate(ids, GenerationConfig(max_new_tokens=30))
    first = plain.token_ids.index(eos_tok)
    assert gen.token_ids == plain.token_ids[:first + 1] and gen.trace.finish_reason == "eos"
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 2]
    if stop.strip():
        gen = Decoder(tiny_model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=30, stop=[stop]))
        assert gen.trace.finish_reason == "stop"
        assert stop not in gen.text and plain.text.startswith(gen.text)


def _cands(logprobs, harms, own=0):
    return Candidates(torch.arange(len(harms)), torch.tensor(logprobs), torch.tensor(harms), own)


def test_rules_choose_as_documented():
    lp = [-0.1, -1.0, -2.0, -3.0]
    harms = [0.9, 0.8, 0.2, 0.1]
    assert PaperRule(k=2).choose(_cands(lp, harms)) == 1  # least harmful of top-2
    assert PaperRule(k=4).choose(_cands(lp, harms)) == 3
    assert ThresholdRule(0.5).choose(_cands(lp, harms)) == 2  # most probable under tau
    assert ThresholdRule(0.95).choose(_cands(lp, harms)) == 0  # own token is fine
    assert ThresholdRule(0.05).choose(_cands(lp, harms)) == 3  # none allowed: least harmful
    assert WeightedRule(0.0).choose(_cands(lp, harms)) == 0
    assert WeightedRule(10.0).choose(_cands(lp, harms)) == 3


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_new_tokens": 10**7}, {"temperature": -1},
    {"top_p": 0}, {"top_m": 0}, {"seed": -1}, {"stop": [""]},
])
def test_config_rejects_absurd_values(kwargs):
    with pytest.raises(InputError):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("bad", [lambda: ThresholdRule(1.5), lambda: PaperRule(0), lambda: WeightedRule(-1)])
def test_rules_reject_bad_parameters(bad):
    with pytest.raises(InputError):
        bad()


def test_unsupported_cache_layout_is_a_clear_error(tiny_model, tiny_tokenizer):
    from rootdefense.errors import ModelError

    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    cache = DynamicCache(config=tiny_model.config)
    prefill(tiny_model, ids, cache)
    with pytest.raises(ModelError, match="not supported by candidate scoring"):
        keep_candidate(cache, ids.shape[1], 5, 0)  # the cache holds no 5 candidates


def test_candidate_top_p_cuts_the_pool(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    probe = random_probe(tiny_model.config.hidden_size, layer=2)
    dec = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=ThresholdRule(0.5))
    full = dec.generate(ids, GenerationConfig(max_new_tokens=8, top_m=16))
    cut = dec.generate(ids, GenerationConfig(max_new_tokens=8, top_m=16, candidate_top_p=0.5))
    assert all(s.candidates == 16 for s in full.trace.steps)
    assert all(1 <= s.candidates < 16 for s in cut.trace.steps)
    for s in cut.trace.steps:  # the pool never lost the most probable token
        assert s.replaced or s.token_id == s.original_id
