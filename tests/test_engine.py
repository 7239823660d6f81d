"""The engine's running batch: rows join between steps and leave when they finish or are
cancelled, each with its own settings, and get exactly what they get alone; the streamer
receives only text the defense can no longer withdraw."""

from __future__ import annotations

import pytest
from test_drafting import PROMPTS, REPETITIVE, _tau_for, prompt_ids, random_probe

from rootdefense.decoding import Decoder, GenerationConfig, Request, Streamer, ThresholdRule
from rootdefense.decoding.streamer import stop_overlap
from rootdefense.drafting import PromptLookupDrafter
from rootdefense.drafting.base import NoDrafter
from rootdefense.errors import InputError

TEXTS = PROMPTS + [REPETITIVE, "hi"]


def _decoders(model, tok):
    probe = random_probe(model.config.hidden_size, layer=2)
    ids = [prompt_ids(tok, t) for t in TEXTS]
    rule = ThresholdRule(_tau_for(model, tok, probe, ids[0]))
    eos = [tok.eos_token_id]
    return {
        "plain": Decoder(model, tok, eos_token_ids=eos),
        "rds": Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos),
        "rds-lazy": Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos, drafter=NoDrafter()),
        "rds-lookup": Decoder(model, tok, probe=probe, rule=rule, eos_token_ids=eos, drafter=PromptLookupDrafter()),
    }


@pytest.mark.parametrize("name", ["plain", "rds", "rds-lazy", "rds-lookup"])
def test_a_row_added_mid_decode_gets_its_greedy_answer(tiny_model, tiny_tokenizer, name):
    dec = _decoders(tiny_model, tiny_tokenizer)[name]
    ids = [prompt_ids(tiny_tokenizer, t) for t in TEXTS]
    cfg = GenerationConfig(max_new_tokens=24)
    alone = [dec.generate(i, cfg) for i in ids]
    engine = dec.engine()
    rows = [engine.add(Request(ids[0][0].tolist(), cfg)), engine.add(Request(ids[1][0].tolist(), cfg))]
    for k, i in enumerate(ids[2:]):  # the others join one by one, two steps apart, while the first decode
        for _ in range(2 + k):
            engine.step()
        rows.append(engine.add(Request(i[0].tolist(), cfg)))
    engine.run()
    for row, want in zip(rows, alone, strict=True):
        assert row.result.token_ids == want.token_ids
        assert row.result.text == want.text
        assert [s.replaced for s in row.result.trace.steps] == [s.replaced for s in want.trace.steps]


def test_each_row_keeps_its_own_settings(tiny_model, tiny_tokenizer):
    """max tokens, temperature, seed and stop strings per row, in one batch."""
    dec = _decoders(tiny_model, tiny_tokenizer)["rds-lookup"]
    ids = [prompt_ids(tiny_tokenizer, t) for t in TEXTS[:4]]
    greedy = dec.generate(ids[0], GenerationConfig(max_new_tokens=30))
    stop = greedy.text[8:11]
    cfgs = [GenerationConfig(max_new_tokens=30, stop=[stop]), GenerationConfig(max_new_tokens=5),
            GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7),
            GenerationConfig(max_new_tokens=20, temperature=0.7, top_p=0.9, seed=3)]
    alone = [dec.generate(i, c) for i, c in zip(ids, cfgs, strict=True)]
    batch = dec.generate_batch(ids, cfgs)
    for got, want in zip(batch, alone, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
    assert batch[0].trace.finish_reason == "stop" and stop not in batch[0].text
    assert len(batch[1].token_ids) == 5


def test_finished_and_cancelled_rows_free_their_cache_slots(tiny_model, tiny_tokenizer):
    dec = _decoders(tiny_model, tiny_tokenizer)["rds-lookup"]
    ids = [prompt_ids(tiny_tokenizer, t) for t in TEXTS[:3]]
    engine = dec.engine()
    short = engine.add(Request(ids[0][0].tolist(), GenerationConfig(max_new_tokens=2)))
    long = engine.add(Request(ids[1][0].tolist(), GenerationConfig(max_new_tokens=60)))
    other = engine.add(Request(ids[2][0].tolist(), GenerationConfig(max_new_tokens=60)))
    engine.step()
    assert engine.cache_rows() == 3
    while not short.done:
        engine.step()
    assert engine.cache_rows() == 2 and short.result.trace.finish_reason == "length"
    engine.cancel(long)
    assert long.done and long.result.trace.finish_reason == "cancelled"
    assert engine.cache_rows() == 1 and engine.live == [other]
    assert engine.cache.layers[0].keys.shape[0] == 1
    # what is left is the remaining row's own past only: no column the cancelled rows used
    assert int(engine.past.sum()) == engine.past.shape[1]
    engine.run()
    assert other.result.token_ids == dec.generate(ids[2], GenerationConfig(max_new_tokens=60)).token_ids
    assert engine.cache_rows() == 0 and not engine.busy


def test_a_request_is_checked():
    with pytest.raises(InputError, match="at least one prompt token"):
        Request([])
    with pytest.raises(InputError, match="query_len"):
        Request([1, 2, 3], query_len=4)


class Recorder(Streamer):
    def __init__(self):
        self.pieces, self.steps, self.ended = [], 0, None

    def put(self, text, steps):
        self.pieces.append(text)
        self.steps += len(steps)

    def end(self, generation):
        self.ended = generation


@pytest.mark.parametrize("stop", [False, True])
def test_the_streamer_gets_the_final_text_and_never_a_stop_string(tiny_model, tiny_tokenizer, stop):
    dec = _decoders(tiny_model, tiny_tokenizer)["rds-lookup"]
    ids = prompt_ids(tiny_tokenizer, TEXTS[0])
    cfg = GenerationConfig(max_new_tokens=30)
    if stop:
        cfg = GenerationConfig(max_new_tokens=30, stop=[dec.generate(ids, cfg).text[10:13]])
    rec = Recorder()
    gen = dec.generate(ids, cfg, streamer=rec)
    assert "".join(rec.pieces) == gen.text and rec.ended is gen
    assert rec.steps == len(gen.token_ids)
    assert len([p for p in rec.pieces if p]) > 1, "the text arrives as it is decoded, not in one burst"
    if stop:
        assert all(cfg.stop[0] not in "".join(rec.pieces[:k + 1]) for k in range(len(rec.pieces)))


def test_stop_overlap():
    assert stop_overlap("hello wor", ["world"]) == 3
    assert stop_overlap("hello", ["xyz"]) == 0
    assert stop_overlap("ab", ["abc", "b"]) == 2
