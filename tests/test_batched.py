"""Batch generation: each prompt's answer equals the single-prompt decoder's (greedy), with
and without the defense, whatever the prompt lengths and finishing order."""

from __future__ import annotations

import pytest
import torch

from rootdefense.decoding import Decoder, GenerationConfig, ThresholdRule, make_rule
from rootdefense.models import encode_chat
from rootdefense.probes.base import LinearProbe

PROMPTS = ["How do I bake bread?", "Sure, here is a tutorial: step one, step two, step three.",
           "hi", "The quick brown fox jumps over the lazy dog 0123456789 times! I cannot help with that."]


@pytest.fixture()
def parts(tiny_model, tiny_tokenizer):
    g = torch.Generator().manual_seed(7)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5, meta={"kind": "response"})
    ids = [encode_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return tiny_model, tiny_tokenizer, probe, ids


@pytest.mark.parametrize("rule", [None, "threshold", "paper", "weighted"])
@pytest.mark.parametrize("n", [1, 7, 30])
def test_batch_equals_one_by_one(parts, rule, n):
    model, tok, probe, ids = parts
    r = None if rule is None else make_rule(rule, tau=0.5)
    cfg = GenerationConfig(max_new_tokens=n, stop=["step"] if n == 30 else [])
    eos = [tok.eos_token_id]
    single = [Decoder(model, tok, probe=probe, rule=r, eos_token_ids=eos).generate(i, cfg) for i in ids]
    batch = Decoder(model, tok, probe=probe, rule=r, eos_token_ids=eos).generate_batch(ids, cfg)
    for a, b in zip(single, batch, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text and b.trace.finish_reason == a.trace.finish_reason
        assert [s.replaced for s in b.trace.steps] == [s.replaced for s in a.trace.steps]
        assert max((abs(x.harm - y.harm) for x, y in zip(a.trace.steps, b.trace.steps)), default=0) < 1e-4
    if rule == "threshold" and n == 30:
        assert any(s.replaced for g in batch for s in g.trace.steps)  # the rule did intervene


def test_rows_finish_independently(parts):
    """A stop string that only one row produces early ends that row; the others go on, and
    every answer still equals its single-prompt decoding."""
    model, tok, probe, ids = parts
    eos = [tok.eos_token_id]
    rule = ThresholdRule(0.5)
    free = Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos).generate(ids[0], GenerationConfig(
        max_new_tokens=20))
    stop = next(free.text[i:i + 3] for i in range(2, len(free.text) - 3) if free.text[i:i + 3].strip())
    cfg = GenerationConfig(max_new_tokens=20, stop=[stop])
    single = [Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos).generate(i, cfg) for i in ids]
    gens = Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos).generate_batch(ids, cfg)
    assert [g.token_ids for g in gens] == [g.token_ids for g in single]
    assert gens[0].trace.finish_reason == "stop" and len({len(g.token_ids) for g in gens}) > 1
    assert gens[0].timings["batch_size"] == 4 and gens[0].timings["batch_tokens"] == sum(len(g.token_ids) for g in gens)
    assert Decoder(model, tok).generate_batch([], cfg) == []


@pytest.mark.parametrize("drafter", [None, "ngram"])
@pytest.mark.parametrize("tau, leave", [(0.999999, "none"), (0.56, "some"), (0.52, "all")])
def test_rds_expert_batch_equals_one_by_one(tiny_tokenizer, tmp_path, tau, leave, drafter):
    """The tuned default defense in a batch: unflagged answers stay in the batch, flagged
    ones (and loops) are answered by the correcting decoder; all equal single answers."""
    from conftest import make_tiny_model
    from test_defenses import MODEL_ID, MODEL_SEED, write_expert

    from rootdefense.api import Defender, DefenseSettings
    from rootdefense.models.loading import LoadedModel

    tok = tiny_tokenizer
    lm = LoadedModel(make_tiny_model(tok, seed=MODEL_SEED), tok, MODEL_ID, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"})
    d = Defender(lm, probe, DefenseSettings(defense="rds-expert", tau=tau, correction={"k": 2, "window": 4},
                                            expert=str(write_expert(tok, tmp_path / "expert")),
                                            drafter=drafter))
    cfg = GenerationConfig(max_new_tokens=40)
    batch = d.generate_batch(PROMPTS, config=cfg)
    if drafter is not None and leave != "all":  # the batch drafted
        assert any(g is not None and g.timings.get("drafted", 0) > 0 for g in batch)
    single = [d.generate(p, config=cfg) for p in PROMPTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.trace.events for b in batch] == [s.trace.events for s in single]
    flagged = sum(any(e["reason"] == "harm" for e in s.trace.events) for s in single)
    assert flagged == {"none": 0, "some": 3, "all": 4}[leave]  # flagged answers leave the batch
