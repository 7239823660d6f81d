"""Batched speculative RDS: every row's answer equals its single-stream speculative answer
(and the plain decoder's), greedy, with and without the threshold rule, whatever the
drafter proposes, the prompt lengths and the finishing order."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_drafting import (
    PROMPTS,
    REPETITIVE,
    _tau_for,
    make_drafter,
    prompt_ids,
    random_probe,
)

from rootdefense.decoding import Decoder, GenerationConfig, ThresholdRule, make_rule
from rootdefense.drafting import PromptLookupDrafter
from rootdefense.drafting.base import NoDrafter
from rootdefense.errors import InputError

TEXTS = PROMPTS + [REPETITIVE, "hi"]


@pytest.fixture(scope="module")
def draft_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=1, layers=2)


def _same(got, want):
    assert got.token_ids == want.token_ids
    assert got.text == want.text and got.trace.finish_reason == want.trace.finish_reason
    for a, b in zip(got.trace.steps, want.trace.steps, strict=True):
        assert (a.token_id, a.original_id, a.replaced) == (b.token_id, b.original_id, b.replaced)
        if b.harm is not None:
            assert a.harm == pytest.approx(b.harm, abs=1e-4)
            assert a.original_harm == pytest.approx(b.original_harm, abs=1e-4)


@pytest.mark.parametrize("kind", ["lookup", "draft-model", "self", "lazy"])
@pytest.mark.parametrize("n", [1, 9, 40])
def test_undefended_batch_equals_plain(tiny_model, tiny_tokenizer, draft_model, kind, n):
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    cfg = GenerationConfig(max_new_tokens=n)
    eos = [tok.eos_token_id]
    dec = Decoder(tiny_model, tok, drafter=make_drafter(kind, tok, tiny_model, draft_model),
                                  eos_token_ids=eos, max_draft=5)
    batch = dec.generate_batch(ids, cfg)
    for i, g in zip(ids, batch, strict=True):
        _same(g, Decoder(tiny_model, tok, eos_token_ids=eos).generate(i, cfg))
    t = batch[TEXTS.index(REPETITIVE)].timings
    assert t["batch_size"] == len(TEXTS) and 0 <= t["accepted"] <= t["drafted"]
    if n == 40 and kind in ("lookup", "self"):
        assert t["tokens_per_forward"] > 1.2, "drafts were accepted inside the batch"


@pytest.mark.parametrize(("layer", "seed"), [(3, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("kind", ["lookup", "self", "lazy"])
def test_defended_batch_equals_single_speculative(tiny_model, tiny_tokenizer, draft_model, layer, seed, kind):
    """The threshold rule inside a batch: rows that draft and rows that score candidates
    share one forward; every row corrects exactly the tokens it corrects alone."""
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    probe = random_probe(tiny_model.config.hidden_size, layer=layer, seed=seed)
    rule = ThresholdRule(_tau_for(tiny_model, tok, probe, ids[0]))
    cfg = GenerationConfig(max_new_tokens=30, top_m=8)
    single = [Decoder(tiny_model, tok, drafter=make_drafter(kind, tok, tiny_model, draft_model), probe=probe,
                                 rule=rule).generate(i, cfg) for i in ids]
    plain = [Decoder(tiny_model, tok, probe=probe, rule=rule).generate(i, cfg) for i in ids]
    batch = Decoder(tiny_model, tok, drafter=make_drafter(kind, tok, tiny_model, draft_model),
                                    probe=probe, rule=rule).generate_batch(ids, cfg)
    assert sum(g.trace.replaced for g in plain) > 0, "tau chosen so that the rule intervenes"
    for b, s, p in zip(batch, single, plain, strict=True):
        _same(b, s)
        _same(b, p)
        assert b.timings["exact_steps"] == s.timings["exact_steps"]


@pytest.mark.parametrize("seed", [1, 2])
def test_lazy_rows_fill_the_slots_a_pool_paid_for(tiny_model, tiny_tokenizer, seed):
    """With ``--drafter lazy`` a row drafts nothing of its own; in rounds where a neighbour
    sends its candidate pool, it fills the slots with prompt-lookup drafts. Answers are the
    same with and without filling, and the filled rounds keep more than one token per row."""
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    probe = random_probe(tiny_model.config.hidden_size, layer=2, seed=seed)
    rule = ThresholdRule(_tau_for(tiny_model, tok, probe, ids[0]))
    cfg = GenerationConfig(max_new_tokens=40, top_m=8)
    plain = [Decoder(tiny_model, tok, probe=probe, rule=rule).generate(i, cfg) for i in ids]
    runs = {fill: Decoder(tiny_model, tok, drafter=NoDrafter(), probe=probe, rule=rule, fill=fill)
            .generate_batch(ids, cfg) for fill in (True, False)}
    for filled, unfilled, p in zip(runs[True], runs[False], plain, strict=True):
        _same(filled, p)
        _same(unfilled, p)
        assert unfilled.timings["filled"] == 0 and unfilled.timings["drafted"] == 0
    assert sum(g.timings["filled"] for g in runs[True]) > 0, "some rows filled slots a pool paid for"
    assert sum(g.timings["accepted"] for g in runs[True]) > 0, "and kept some of those drafts"
    forwards = {fill: max(g.timings["forwards"] for g in gens) for fill, gens in runs.items()}
    assert forwards[True] <= forwards[False]


@pytest.mark.parametrize("first", [0, 1, 3])
def test_batch_pools_are_scored_in_stages(tiny_model, tiny_tokenizer, first):
    """Rows deciding a position exactly send their own token and the next candidates first,
    the rest of the pool in a later round only while the choice is open: same answers as
    the plain decoder, fewer candidates scored."""
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    probe = random_probe(tiny_model.config.hidden_size, layer=2, seed=3)
    rule = ThresholdRule(_tau_for(tiny_model, tok, probe, ids[1], quantile=0.4))
    cfg = GenerationConfig(max_new_tokens=30, top_m=8)
    plain = [Decoder(tiny_model, tok, probe=probe, rule=rule).generate(i, cfg) for i in ids]
    batch = Decoder(tiny_model, tok, drafter=NoDrafter(), probe=probe, rule=rule,
                                    first_candidates=first).generate_batch(ids, cfg)
    assert sum(g.trace.replaced for g in plain) > 0
    for b, p in zip(batch, plain, strict=True):
        _same(b, p)
        assert [s.candidates for s in b.trace.steps if s.replaced] == [s.candidates for s in p.trace.steps if s.replaced]
    scored = sum(g.timings["candidates_scored"] for g in batch)
    exact = sum(g.timings["exact_steps"] for g in batch)
    assert exact > 0
    if first == 0:
        assert scored == exact * cfg.top_m
    else:
        assert scored < exact * cfg.top_m


def test_pool_stages():
    from rootdefense.decoding.pools import BATCH_STAGES
    from rootdefense.decoding.pools import pool_stages

    assert pool_stages(20, 0, 3, True) == [0, 3, 20]
    assert pool_stages(20, 0, 3, True, more=BATCH_STAGES) == [0, 3, 6, 10, 20]
    assert pool_stages(8, 0, 3, True, more=(10, 6, 6, 2)) == [0, 3, 6, 8]  # inside (first, m) only, once each
    assert pool_stages(20, 1, 3, True, more=BATCH_STAGES) == [0, 20]  # own token not first: all at once
    assert pool_stages(20, 0, 3, False, more=BATCH_STAGES) == [0, 20]  # sampling: all at once
    assert pool_stages(20, 0, 0, True, more=BATCH_STAGES) == [0, 20]


@pytest.mark.parametrize("top_m", [6, 20])
def test_all_harmful_pools_fall_back_to_the_least_harmful(tiny_model, tiny_tokenizer, top_m):
    """Every candidate harmful: the rule takes the least harmful, which may have been scored
    in the first stage; it is then forwarded alone. Same answers as the plain decoder,
    single-stream and batched."""
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    probe = random_probe(tiny_model.config.hidden_size, layer=2, seed=5)
    rule = ThresholdRule(1e-6)
    cfg = GenerationConfig(max_new_tokens=12, top_m=top_m)  # 20: the batch scores in stages 3 / 6 / 10 / 20
    plain = [Decoder(tiny_model, tok, probe=probe, rule=rule).generate(i, cfg) for i in ids]
    single = [Decoder(tiny_model, tok, drafter=NoDrafter(), probe=probe, rule=rule).generate(i, cfg) for i in ids]
    batch = Decoder(tiny_model, tok, drafter=NoDrafter(), probe=probe, rule=rule).generate_batch(ids, cfg)
    forced = 0
    for b, s, p in zip(batch, single, plain, strict=True):
        _same(b, p)
        _same(s, p)
        t = s.timings
        assert t["candidates_scored"] == t["exact_steps"] * cfg.top_m  # nothing is harmless: all scored
        forced += t["forwards"] - t["rounds"] - 2 * t["exact_steps"]  # the choice forwarded alone
    assert forced > 0, "some least-harmful choices came from the first stage"


def test_rows_finish_at_different_times(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [prompt_ids(tok, t) for t in TEXTS]
    free = Decoder(tiny_model, tok).generate(ids[0], GenerationConfig(max_new_tokens=20))
    stop = next(free.text[i:i + 3] for i in range(2, len(free.text) - 3) if free.text[i:i + 3].strip())
    cfg = GenerationConfig(max_new_tokens=20, stop=[stop])
    gens = Decoder(tiny_model, tok, drafter=PromptLookupDrafter()).generate_batch(ids, cfg)
    want = [Decoder(tiny_model, tok).generate(i, cfg) for i in ids]
    assert [g.token_ids for g in gens] == [w.token_ids for w in want]
    assert gens[0].trace.finish_reason == "stop" and len({len(g.token_ids) for g in gens}) > 1
    assert Decoder(tiny_model, tok, drafter=PromptLookupDrafter()).generate_batch([], cfg) == []


def test_bad_settings_are_refused(tiny_model, tiny_tokenizer):
    probe = random_probe(tiny_model.config.hidden_size, layer=2)
    with pytest.raises(InputError, match="threshold rule only"):
        Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), probe=probe,
                                rule=make_rule("paper", tau=0.5))
    with pytest.raises(InputError, match="max_draft"):
        Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), max_draft=-1)
    for bad in (-1, 2.5):
        with pytest.raises(InputError, match="first_candidates must be an integer >= 0"):
            Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), first_candidates=bad)
        with pytest.raises(InputError, match="first_candidates must be an integer >= 0"):
            Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), first_candidates=bad)

    class Featured(PromptLookupDrafter):
        name = "feature-drafter"
        needs_target_features = True

    with pytest.raises(InputError, match="cannot draft for a batch"):
        Decoder(tiny_model, tiny_tokenizer, drafter=Featured()).generate_batch(
            [prompt_ids(tiny_tokenizer, t) for t in TEXTS[:2]], GenerationConfig(max_new_tokens=4))
    assert torch.is_grad_enabled()
