"""Speculative RDS on tiny random models: drafters propose what they should, verification is
lossless (greedy output equals the plain decoder's, sampled output has its distribution),
and the harm check inside verification corrects exactly the tokens the plain defended
decoder corrects."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer
from scipy.stats import chi2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rootdefense.decoding import (
    Streamer,
    Decoder,
    GenerationConfig,
    PaperRule,
    ThresholdRule,
    WeightedRule,
)
from rootdefense.decoding.rules import Candidates
from rootdefense.decoding.sampling import step_logprobs, target_probs, verified_choice
from rootdefense.drafting import (
    Drafter,
    DraftModelDrafter,
    NoDrafter,
    PromptLookupDrafter,
)
from rootdefense.errors import InputError, ModelError
from rootdefense.models import encode_chat, normalize_messages
from rootdefense.probes.base import LinearProbe

PROMPTS = ["How do I bake bread?", "Sure, here is a tutorial", "The quick brown fox"]
REPETITIVE = "step one, step two, step three, step one, step two, step three, step one, step two"
DRAFTERS = ["lookup", "draft-model", "self", "lazy"]


def prompt_ids(tok, text):
    return encode_chat(tok, normalize_messages(text))


def random_probe(hidden, layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    return LinearProbe(weight=torch.randn(hidden, generator=g), bias=0.0, layer=layer,
                       threshold=0.5, meta={"model_id": "tiny"})


@pytest.fixture(scope="module")
def draft_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=1, layers=2)


def make_drafter(kind, tok, model, draft_model):
    if kind == "lookup":
        return PromptLookupDrafter()
    if kind == "draft-model":
        return DraftModelDrafter(draft_model, tok, tok)
    if kind == "lazy":
        return NoDrafter()
    return DraftModelDrafter(model, tok, tok, max_k=6)  # the target drafting for itself


# ---- prompt lookup ---------------------------------------------------------------------

@pytest.mark.parametrize(("context", "k", "want"), [
    ([1, 2, 3, 4, 5, 9, 9, 2, 3], 4, [4, 5, 9, 9]),  # what followed the earlier "2 3"
    ([5, 3, 8, 6, 3, 9, 5, 3], 1, [8]),  # the longer match "5 3" beats the newer "3"
    ([1, 2, 7, 1, 2, 8, 1, 2], 1, [8]),  # the most recent "1 2" wins
    ([4, 1, 2, 1, 2], 5, [1, 2, 1, 2, 1]),  # a match near the end repeats periodically
    ([5, 6, 7], 3, []),  # nothing occurred before
    ([3], 2, []),
])
def test_prompt_lookup_proposes_what_followed(context, k, want):
    assert PromptLookupDrafter(max_ngram=3, adaptive=False).propose(context, k) == want


def test_prompt_lookup_min_ngram_and_max_k():
    assert PromptLookupDrafter(min_ngram=2, adaptive=False).propose([1, 5, 1], 3) == []
    assert PromptLookupDrafter(min_ngram=1, adaptive=False).propose([1, 5, 1], 3) == [5, 1, 5]
    assert PromptLookupDrafter(max_k=2, adaptive=False).propose([1, 2, 3, 4, 1], 5) == [2, 3]
    for bad in ({"min_ngram": 0}, {"min_ngram": 3, "max_ngram": 2}, {"max_k": 0}, {"start_k": 11}):
        with pytest.raises(InputError):
            PromptLookupDrafter(**bad)


def test_prompt_lookup_draft_length_adapts():
    """+2 after a fully accepted draft, -1 after a rejection, within 1..max_k; reset and
    fresh copies start again at start_k."""
    d = PromptLookupDrafter(max_k=6, start_k=2)
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
    assert d.propose(ctx, 8) == [2, 3]
    d.accepted(2, 2)
    assert d.propose(ctx, 8) == [2, 3, 4, 5]
    d.accepted(4, 4)
    d.accepted(6, 6)
    assert len(d.propose(ctx, 8)) == 6  # capped at max_k
    for _ in range(9):
        d.accepted(6, 0)
    assert d.propose(ctx, 8) == [2]
    d.accepted(0, 0)  # nothing proposed: no change
    assert d.k == 1
    assert d.fresh().k == 2 and d.fresh().describe()["adaptive"]
    d.reset()
    assert d.k == 2


def _lookup_by_scan(context, k, max_ngram=3, min_ngram=1):
    """The definition, by a plain backward scan (slow, obviously right)."""
    for n in range(min(max_ngram, len(context)), min_ngram - 1, -1):
        for end in range(len(context) - 2, n - 2, -1):
            if context[end - n + 1:end + 1] == context[-n:]:
                seq = list(context)
                for i in range(k):
                    seq.append(seq[end + 1 + i])
                return seq[len(context):]
    return []


def test_prompt_lookup_index_matches_a_backward_scan():
    """One drafter kept across growing, cut back and diverging contexts (as decoding with
    rejections and replacements gives it) proposes what a fresh scan finds."""
    rnd = random.Random(0)
    drafter = PromptLookupDrafter(adaptive=False)
    context = [rnd.randrange(6) for _ in range(5)]
    for _ in range(300):
        r = rnd.random()
        if r < 0.7:
            context.append(rnd.randrange(6))
        elif r < 0.9 and len(context) > 2:
            context[-1] = (context[-1] + 1) % 6  # a replaced token
        else:
            context = context[:rnd.randrange(1, len(context) + 1)]
        k = rnd.randrange(1, 6)
        assert drafter.propose(context, k) == _lookup_by_scan(context, k)


# ---- draft model -----------------------------------------------------------------------

def _greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_draft_model_proposes_its_greedy_continuation(tiny_tokenizer, draft_model):
    drafter = DraftModelDrafter(draft_model, tiny_tokenizer, tiny_tokenizer, max_k=8, start_k=4)
    ctx = prompt_ids(tiny_tokenizer, PROMPTS[0])[0].tolist()
    assert drafter.propose(ctx, 4) == _greedy(draft_model, ctx, 4)
    # the cache follows the context: grown, cut back, diverged
    for context in (ctx + [17], ctx + [17, 40], ctx[:-3], ctx[:-3] + [99, 5], ctx[:-3] + [99, 5]):
        assert drafter.propose(context, 3) == _greedy(draft_model, context, 3)
    drafter.accepted(3, 3)
    assert drafter.k == 6
    drafter.accepted(6, 1)
    assert drafter.k == 5
    assert len(drafter.propose(ctx, 10)) == 5
    drafter.reset()
    assert drafter.k == 4 and drafter.propose(ctx, 8) == _greedy(draft_model, ctx, 4)


def _other_tokenizer():
    """A tokenizer of the same size trained on other text: same length, other ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Completely different words: zebra yacht xylophone quartz.",
                             "Another sentence about violins, umbrellas and tangerines."] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")


def test_draft_model_with_another_vocabulary_is_refused(tiny_tokenizer):
    other = _other_tokenizer()
    other_model = make_tiny_model(other, seed=2, layers=1)
    with pytest.raises(InputError, match="must share the target's tokenizer"):
        DraftModelDrafter(other_model, other, tiny_tokenizer)
    bigger = make_tokenizer()
    bigger.add_tokens(["<tool_call>"])
    small_model = make_tiny_model(tiny_tokenizer, seed=2, layers=1)
    with pytest.raises(InputError, match="differs from the target's"):
        DraftModelDrafter(small_model, bigger, tiny_tokenizer)
    with pytest.raises(ModelError, match="predicts 300 token ids but the tokenizer has 301"):
        DraftModelDrafter(small_model, bigger, bigger)


# ---- lossless greedy -------------------------------------------------------------------

@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("text", PROMPTS + [REPETITIVE])
def test_greedy_equals_plain_decoder(tiny_model, tiny_tokenizer, draft_model, kind, text):
    ids = prompt_ids(tiny_tokenizer, text)
    drafter = make_drafter(kind, tiny_tokenizer, tiny_model, draft_model)
    spec = Decoder(tiny_model, tiny_tokenizer, drafter=drafter, max_draft=5)
    for n in (1, 6, 40):
        cfg = GenerationConfig(max_new_tokens=n)
        plain = Decoder(tiny_model, tiny_tokenizer).generate(ids, cfg)
        gen = spec.generate(ids, cfg)
        assert gen.token_ids == plain.token_ids
        assert gen.text == plain.text and gen.trace.finish_reason == plain.trace.finish_reason
        assert [s.prob for s in gen.trace.steps] == pytest.approx([s.prob for s in plain.trace.steps], abs=1e-4)
        assert not any(s.replaced for s in gen.trace.steps)


@pytest.mark.parametrize("kind", DRAFTERS)
def test_eos_and_stop_strings_inside_drafts(tiny_model, tiny_tokenizer, draft_model, kind):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    plain = Decoder(tiny_model, tiny_tokenizer).generate(ids, GenerationConfig(max_new_tokens=30))
    drafter = make_drafter(kind, tiny_tokenizer, tiny_model, draft_model)
    for pos in (0, 4, 9):
        eos_tok = plain.token_ids[pos]
        cfg = GenerationConfig(max_new_tokens=30)
        want = Decoder(tiny_model, tiny_tokenizer, eos_token_ids=[eos_tok]).generate(ids, cfg)
        got = Decoder(tiny_model, tiny_tokenizer, drafter=drafter, eos_token_ids=[eos_tok]).generate(ids, cfg)
        assert got.token_ids == want.token_ids and got.trace.finish_reason == "eos"
    for start in (3, len(plain.text) // 2):
        stop = plain.text[start:start + 2]
        if not stop.strip():
            continue
        cfg = GenerationConfig(max_new_tokens=30, stop=[stop])
        want = Decoder(tiny_model, tiny_tokenizer).generate(ids, cfg)
        got = Decoder(tiny_model, tiny_tokenizer, drafter=drafter).generate(ids, cfg)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.trace.finish_reason == "stop" and stop not in got.text


def test_the_streamer_sees_every_step(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, REPETITIVE)
    seen = []

    class Seen(Streamer):
        def put(self, text, steps):
            seen.append((steps, text))

    gen = Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter()).generate(
        ids, GenerationConfig(max_new_tokens=25), streamer=Seen())
    assert [s for steps, _ in seen for s in steps] == gen.trace.steps
    assert "".join(p for _, p in seen) == gen.text


def test_acceptance_counts(tiny_model, tiny_tokenizer, draft_model):
    ids = prompt_ids(tiny_tokenizer, REPETITIVE)
    cfg = GenerationConfig(max_new_tokens=40)
    for kind in DRAFTERS:
        gen = Decoder(tiny_model, tiny_tokenizer, drafter=make_drafter(kind, tiny_tokenizer, tiny_model,
                                                                          draft_model)).generate(ids, cfg)
        t = gen.timings
        assert 0 <= t["accepted"] <= t["drafted"]
        assert t["forwards"] == t["rounds"] + t["exact_steps"] and t["exact_steps"] == 0
        # every round commits its head token plus the accepted drafts (the last may stop early)
        assert t["rounds"] <= len(gen.token_ids) <= t["rounds"] + t["accepted"]
        assert t["mean_accepted"] == pytest.approx(t["accepted"] / t["rounds"], abs=1e-3)
        if kind == "lookup":  # the answer falls into a loop that prompt lookup copies
            assert t["accepted"] > 0 and t["tokens_per_forward"] > 1.2
        if kind == "self":  # the target's own drafts are all accepted (barring float ties)
            assert t["accepted"] >= 0.9 * t["drafted"] and t["tokens_per_forward"] > 3
        if kind == "lazy":  # one forward per token, no drafts
            assert t["drafted"] == 0 and t["rounds"] == len(gen.token_ids)


# ---- safety inside verification -------------------------------------------------------

def _tau_for(model, tok, probe, ids, quantile=0.75):
    """A threshold the undefended answer crosses on about a quarter of its tokens."""
    watched = Decoder(model, tok, probe=probe).generate(ids, GenerationConfig(max_new_tokens=30))
    harms = sorted(s.harm for s in watched.trace.steps)
    i = int(quantile * len(harms))  # halfway between two harms, so no token sits on the threshold
    return min(max((harms[i - 1] + harms[i]) / 2, 0.01), 0.99)


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize(("text", "layer", "seed"), [(PROMPTS[0], 3, 1), (PROMPTS[1], 2, 2),
                                                     (REPETITIVE, 3, 3), (PROMPTS[2], 1, 4)])
def test_defended_greedy_equals_plain_defended(tiny_model, tiny_tokenizer, draft_model, kind, text, layer, seed):
    ids = prompt_ids(tiny_tokenizer, text)
    probe = random_probe(tiny_model.config.hidden_size, layer=layer, seed=seed)
    rule = ThresholdRule(_tau_for(tiny_model, tiny_tokenizer, probe, ids))
    cfg = GenerationConfig(max_new_tokens=30, top_m=8)
    plain = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=rule).generate(ids, cfg)
    drafter = make_drafter(kind, tiny_tokenizer, tiny_model, draft_model)
    gen = Decoder(tiny_model, tiny_tokenizer, drafter=drafter, probe=probe, rule=rule).generate(ids, cfg)
    assert plain.trace.replaced > 0, "tau chosen so that the rule intervenes"
    assert gen.token_ids == plain.token_ids
    for got, want in zip(gen.trace.steps, plain.trace.steps, strict=True):
        assert (got.token_id, got.original_id, got.replaced) == (want.token_id, want.original_id, want.replaced)
        assert got.harm == pytest.approx(want.harm, abs=1e-4)
        assert got.original_harm == pytest.approx(want.original_harm, abs=1e-4)
        if got.replaced:
            assert got.candidates == want.candidates
    t = gen.timings
    assert t["exact_steps"] >= gen.trace.replaced and t["rounds"] + t["exact_steps"] <= t["forwards"]
    # greedy exact steps score the own token and the next two first, the rest only when needed
    assert t["candidates_scored"] < t["exact_steps"] * cfg.top_m
    if kind == "self":
        assert gen.timings["accepted"] > 0, "drafts were committed between corrections"
    if kind == "lazy":  # candidates scored only where the own token was flagged, not at every step
        assert t["exact_steps"] < len(gen.token_ids)


def test_monitoring_probe_records_the_same_harms(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, REPETITIVE)
    probe = random_probe(tiny_model.config.hidden_size, layer=2)
    cfg = GenerationConfig(max_new_tokens=25)
    plain = Decoder(tiny_model, tiny_tokenizer, probe=probe).generate(ids, cfg)
    gen = Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), probe=probe).generate(ids, cfg)
    assert gen.token_ids == plain.token_ids and gen.timings["accepted"] > 0
    assert [s.harm for s in gen.trace.steps] == pytest.approx([s.harm for s in plain.trace.steps], abs=1e-4)


def test_rules_that_replace_harmless_tokens_are_refused(tiny_model, tiny_tokenizer):
    probe = random_probe(tiny_model.config.hidden_size, layer=2)
    for rule in (PaperRule(5), WeightedRule(2.0)):
        with pytest.raises(InputError, match="threshold rule only"):
            Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), probe=probe, rule=rule)
    with pytest.raises(ValueError, match="needs a probe"):
        Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), rule=ThresholdRule(0.5))
    with pytest.raises(InputError, match="max_draft"):
        Decoder(tiny_model, tiny_tokenizer, drafter=PromptLookupDrafter(), max_draft=-1)


def test_defended_sampling_is_seeded_and_stays_in_allowed_set(tiny_model, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[0])
    probe = random_probe(tiny_model.config.hidden_size, layer=3, seed=1)
    dec = Decoder(tiny_model, tiny_tokenizer, drafter=DraftModelDrafter(tiny_model, tiny_tokenizer, tiny_tokenizer),
                             probe=probe, rule=ThresholdRule(0.5))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=11)
    a, b = dec.generate(ids, cfg), dec.generate(ids, cfg)
    assert a.token_ids == b.token_ids
    assert dec.generate(ids, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=12)).token_ids != a.token_ids
    assert a.trace.replaced > 0
    for s in a.trace.steps:  # every kept own token is harmless; a replacement is allowed unless none was
        assert s.replaced or s.harm < 0.5
        if s.replaced:
            assert s.original_harm >= 0.5 and (s.harm < 0.5 or s.harm <= s.original_harm)


# ---- lossless sampling -----------------------------------------------------------------

def test_target_probs_is_what_own_choice_samples_from():
    from rootdefense.decoding.sampling import own_choice

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8), (1.5, 0.3)):
        cfg = GenerationConfig(temperature=temperature, top_p=top_p)
        lp = step_logprobs(logits, cfg)
        p = target_probs(lp, top_p)
        for seed in range(20):
            ra, rb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert own_choice(lp, cfg, ra) == int(torch.multinomial(p, 1, generator=rb))


def _chi2_ok(counts: dict, expected: dict, n: int) -> bool:
    """Pearson's chi-square over outcomes, rare ones pooled, at the 0.1 % level."""
    stat, pooled_obs, pooled_exp, bins = 0.0, 0, 0.0, 0
    for key, p in expected.items():
        if n * p >= 5:
            stat += (counts.get(key, 0) - n * p) ** 2 / (n * p)
            bins += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(key, 0), pooled_exp + n * p
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    assert sum(counts.values()) == n and set(counts) <= set(expected), "a sample outside the support"
    return stat < chi2.ppf(0.999, bins - 1)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.3, 0.85)])
def test_verified_choice_has_the_target_distribution(temperature, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 2
    cfg = GenerationConfig(temperature=temperature, top_p=top_p)
    lp = step_logprobs(logits, cfg)
    p = target_probs(lp, top_p)
    expected = {i: float(q) for i, q in enumerate(p) if q > 0}
    order = torch.argsort(p, descending=True).tolist()
    rng = torch.Generator().manual_seed(7)
    n = 4000
    for draft in (order[0], order[3], order[-1]):  # likely, less likely, outside the nucleus
        counts: dict[int, int] = {}
        for _ in range(n):
            t = verified_choice(lp, draft, cfg, rng)
            counts[t] = counts.get(t, 0) + 1
        assert _chi2_ok(counts, expected, n)


class _TableDrafter(Drafter):
    """Drafts one fixed token per previous token: deterministic, right some of the time."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def propose(self, context, k):
        return [self.table.get(context[-1], 0)][:k]


def test_speculative_sampling_matches_the_target_distribution(tiny_model, tiny_tokenizer):
    """Two-token answers: the first is the round's head, the second a verified draft; their
    joint frequency over many seeds matches the exact distribution from the logits."""
    ids = prompt_ids(tiny_tokenizer, "Hi")
    cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, top_p=0.9)
    with torch.no_grad():
        p1 = target_probs(step_logprobs(tiny_model(input_ids=ids).logits[0, -1], cfg), cfg.top_p)
        expected, table = {}, {}
        for rank, t1 in enumerate(torch.argsort(p1, descending=True).tolist()):
            if p1[t1] == 0:
                break
            seq = torch.cat([ids, torch.tensor([[t1]])], 1)
            p2 = target_probs(step_logprobs(tiny_model(input_ids=seq).logits[0, -1], cfg), cfg.top_p)
            table[t1] = int(torch.argsort(p2, descending=True)[rank % 2])  # the best or the second best
            expected.update({(t1, t2): float(p1[t1] * p2[t2]) for t2 in torch.nonzero(p2)[:, 0].tolist()})
    dec = Decoder(tiny_model, tiny_tokenizer, drafter=_TableDrafter(table))
    n = 1000
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(n):
        gen = dec.generate(ids, GenerationConfig(max_new_tokens=2, temperature=1.0, top_p=0.9, seed=seed))
        key = tuple(gen.token_ids)
        counts[key] = counts.get(key, 0) + 1
        accepted += gen.timings["accepted"]
    assert 0.1 * n < accepted < 0.9 * n, "both acceptance and rejection were exercised"
    assert _chi2_ok(counts, expected, n)


# ---- staged candidate scoring ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_staged_choice_is_the_threshold_rule(seed):
    """Scoring candidates in probability order and stopping once the choice is settled
    picks exactly what the threshold rule picks from the whole pool."""
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 12, (1,), generator=g))
    tau = float(torch.rand(1, generator=g)) * 0.8 + 0.1
    harms = torch.rand(m, generator=g) ** float(torch.rand(1, generator=g) * 0.5 + 0.1)  # often all harmful
    logprobs = torch.sort(torch.randn(m, generator=g), descending=True).values
    want = ThresholdRule(tau).choose(Candidates(torch.arange(m), logprobs, harms, 0))
    settled = [ThresholdRule(tau).settled(harms[:n].tolist(), m) for n in range(1, m + 1)]
    first = next(i for i, j in enumerate(settled) if j is not None)
    assert settled[first] == want and all(j == want for j in settled[first:])
    assert first == (want if float(harms[want]) < tau else m - 1)  # settled as soon as it can be


@pytest.mark.parametrize("first", [0, 1, 3, 5])
def test_staged_scoring_changes_no_token(tiny_model, tiny_tokenizer, first):
    ids = prompt_ids(tiny_tokenizer, PROMPTS[1])
    probe = random_probe(tiny_model.config.hidden_size, layer=2, seed=2)
    rule = ThresholdRule(_tau_for(tiny_model, tiny_tokenizer, probe, ids, quantile=0.4))
    cfg = GenerationConfig(max_new_tokens=30, top_m=8)
    plain = Decoder(tiny_model, tiny_tokenizer, probe=probe, rule=rule).generate(ids, cfg)
    gen = Decoder(tiny_model, tiny_tokenizer, drafter=NoDrafter(), probe=probe, rule=rule,
                             first_candidates=first).generate(ids, cfg)
    assert plain.trace.replaced > 0
    assert gen.token_ids == plain.token_ids
    assert [s.candidates for s in gen.trace.steps if s.replaced] == [s.candidates for s in plain.trace.steps if s.replaced]
    t = gen.timings
    if first == 0:  # the whole pool at once, every exact step
        assert t["candidates_scored"] == t["exact_steps"] * cfg.top_m
    else:
        assert t["candidates_scored"] < t["exact_steps"] * cfg.top_m
