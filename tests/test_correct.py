"""The correcting decoder (watch -> roll back -> steer with the expert) on a tiny model with a
random LoRA expert and a random probe: exact against an independent recompute, streaming
never silently rewritten, degeneration stopped, settings checked."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_defenses import MODEL_ID, MODEL_SEED, independent_models, write_expert

from rootdefense.correction import Correction, CorrectionSettings, DegenerationGuard, RecoveryMonitor
from rootdefense.correction import steer_choice as _steer_choice
from rootdefense.correction import union_pool as _union_pool
from rootdefense.correction.hook import RowCorrection, complete_sentence
from rootdefense.decoding import Decoder, GenerationConfig, Streamer
from rootdefense.errors import InputError
from rootdefense.expert.adapter import attach_expert
from rootdefense.models import encode_chat
from rootdefense.models.loading import LoadedModel
from rootdefense.probes.base import LinearProbe

PROMPT = "How do I bake bread?"


@pytest.fixture()
def setup(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    folder = write_expert(tok, tmp_path / "expert")
    lm = LoadedModel(make_tiny_model(tok, seed=MODEL_SEED), tok, MODEL_ID, torch.float32, torch.device("cpu"))
    expert = attach_expert(lm, folder)
    g = torch.Generator().manual_seed(11)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"})
    ids = encode_chat(tok, [{"role": "user", "content": PROMPT}])
    return lm, expert, probe, ids, folder


def plain(lm, ids, n):
    return Decoder(lm.model, lm.tokenizer, eos_token_ids=lm.eos_token_ids).generate(
        ids, GenerationConfig(max_new_tokens=n))


class Corrected:
    """rds-expert's correction on the engine, as the Defender builds it."""

    def __init__(self, lm, probe, expert, settings, drafter=None, max_draft=8, query_probe=None):
        self.correction = Correction(probe, settings, expert, query_probe, lm.tokenizer)
        self.decoder = Decoder(lm.model, lm.tokenizer, probe, eos_token_ids=lm.eos_token_ids, drafter=drafter,
                               max_draft=max_draft, correction=self.correction)

    def generate(self, ids, cfg, streamer=None, query_len=None):
        return self.decoder.generate(ids, cfg, streamer=streamer, query_len=query_len)


def decoder(lm, expert, probe, **settings):
    """Most tests here check the steered text itself, which a random expert rarely corrects
    by end_lift nats: they keep it (``uncorrected: release``) unless they say otherwise."""
    settings.setdefault("uncorrected", "release")
    return Corrected(lm, probe, expert, CorrectionSettings(**settings))


def first_harm(lm, probe, ids):
    """The probe's harm of the model's first greedy answer token."""
    out = plain(lm, ids, 1)
    full = torch.cat([ids, torch.tensor([out.token_ids])], 1)
    hidden = lm.model(input_ids=full, output_hidden_states=True).hidden_states[probe.layer][0, -1]
    return float(probe.score(hidden[None])[0])


def test_without_a_flag_the_answer_is_the_undefended_one(setup):
    lm, expert, probe, ids, _ = setup
    gen = decoder(lm, expert, probe, tau=0.999999, k=8, window=8).generate(ids, GenerationConfig(max_new_tokens=12))
    assert gen.token_ids == plain(lm, ids, 12).token_ids
    assert gen.trace.events == [] and {s.source for s in gen.trace.steps} == {"base"}
    assert all(s.harm is not None for s in gen.trace.steps)


def reference_steer(tok, folder, probe, ids, tau, n, expert_top=10, base_top=10, floor=-12.0, use_expert=True,
                    alpha=0.0, alpha_tokens=0, end_lift=3.0):
    """Steering recomputed from scratch with two separate models and full forwards (the
    first ``alpha_tokens`` ranked by p_b + alpha (p_e - p_b), written out here)."""
    base, expert = independent_models(tok, folder)
    out, lift = [], 0.0
    for step in range(n):
        seq = torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1) if out else ids
        lp_b = torch.log_softmax(base(input_ids=seq).logits[0, -1].float(), -1)
        lp_e = torch.log_softmax(expert(input_ids=seq).logits[0, -1].float(), -1) if use_expert else lp_b
        if step < alpha_tokens:
            lp_e = torch.log(torch.clamp(lp_b.exp() + alpha * (lp_e.exp() - lp_b.exp()), min=1e-30))
        own = int(torch.argmax(lp_b))
        pool = _union_pool(lp_e, lp_b, own, expert_top, base_top)
        harms = []
        for t in pool.tolist():
            h = base(input_ids=torch.cat([seq, torch.tensor([[t]])], 1), output_hidden_states=True)
            harms.append(float(probe.score(h.hidden_states[probe.layer][0, -1:].float())[0]))
        if complete_sentence(tok.decode(out, skip_special_tokens=True)) and (lift >= end_lift or not use_expert):
            harms = [0.0 if t == tok.eos_token_id else h for t, h in zip(pool.tolist(), harms)]  # steer_end
        j = _steer_choice(pool, lp_e, lp_b, torch.tensor(harms), tau, floor, None)
        out.append(int(pool[j]))
        if use_expert:  # the expert's raw lift over the base model (the amplified ranking aside)
            raw = torch.log_softmax(expert(input_ids=seq).logits[0, -1].float(), -1)
            lift = max(lift, float(raw[out[-1]] - lp_b[out[-1]]))
        if out[-1] == tok.eos_token_id:
            break
    return out


@torch.no_grad()
def test_flag_rolls_back_and_steering_matches_an_independent_recompute(setup, tiny_tokenizer):
    lm, expert, probe, ids, folder = setup
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    gen = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99).generate(
        ids, GenerationConfig(max_new_tokens=10))
    # flagged at the first token, before anything was streamed: a rollback, nothing retracted
    assert [(e["type"], e["reason"]) for e in gen.trace.events] == [("rollback", "harm")]
    assert gen.trace.events[0]["keep_tokens"] == 0 and gen.trace.events[0]["answer_tokens_dropped"] == 1
    assert {s.source for s in gen.trace.steps} == {"expert"}
    ref = reference_steer(tiny_tokenizer, folder, probe, ids, tau, len(gen.token_ids))
    assert gen.token_ids == ref
    assert gen.trace.summary()["rollbacks"] == 1


@torch.no_grad()
@pytest.mark.parametrize("steer_tau", [0.2, 0.8])
def test_steering_threshold_is_its_own_setting(setup, tiny_tokenizer, steer_tau):
    """The monitor flags at its tau; the steered tokens are then chosen against steer_tau,
    exactly as an independent recompute at that threshold chooses them."""
    lm, expert, probe, ids, folder = setup
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    gen = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99, steer_tau=steer_tau).generate(
        ids, GenerationConfig(max_new_tokens=10))
    assert gen.trace.summary()["flags"] == 1 and {s.source for s in gen.trace.steps} == {"expert"}
    assert gen.token_ids == reference_steer(tiny_tokenizer, folder, probe, ids, steer_tau, len(gen.token_ids))
    at_tau = reference_steer(tiny_tokenizer, folder, probe, ids, tau, len(gen.token_ids))
    assert (gen.token_ids == at_tau) == (reference_steer(tiny_tokenizer, folder, probe, ids, steer_tau, 10) == at_tau)


@torch.no_grad()
def test_staged_steering_chooses_what_the_whole_pool_chooses(setup):
    """Greedy steering scores a few plausible candidates first and the rest only when none
    passes; at every threshold the answers equal scoring the whole pool at once, both
    outcomes of the first stage occur, and fewer candidates are scored in all."""
    lm, expert, probe, _, _ = setup
    widths = {0: [], 3: []}
    outcomes = set()
    for text in LATE_PROMPTS:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": text}])
        for tau in (0.2, 0.4, 0.5, 0.6, 0.8):
            answers = {}
            for first in (0, 3):
                dec = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99, steer_first=first)
                gen = dec.generate(ids, GenerationConfig(max_new_tokens=8))
                answers[first] = gen.token_ids
                t = gen.timings
                widths[first].append(t["candidates_scored"])
                if first == 3:  # pool forwards: every forward that verified no chain
                    outcomes.add("settled" if t["forwards"] - t["rounds"] == t["exact_steps"] else "second stage")
            assert answers[0] == answers[3], (text, tau)
    assert outcomes == {"settled", "second stage"}
    assert sum(widths[3]) < sum(widths[0])


@torch.no_grad()
def test_base_outputs_are_unchanged_after_steering(setup):
    lm, expert, probe, ids, _ = setup
    before = plain(lm, ids, 8).token_ids
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    decoder(lm, expert, probe, tau=tau, k=1, window=1).generate(ids, GenerationConfig(max_new_tokens=6))
    assert plain(lm, ids, 8).token_ids == before


LATE_PROMPTS = [PROMPT, "Sure, here is a tutorial", "The quick brown fox", "step one, step two", "Mix flour"]


def late_flag(lm, expert, probe, n=16):
    """A prompt and threshold that its answer first reaches after the third token:
    (ids, tau, index)."""
    for text in LATE_PROMPTS:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": text}])
        harms = [s.harm for s in decoder(lm, expert, probe, tau=0.999999, k=8, window=8).generate(
            ids, GenerationConfig(max_new_tokens=n)).trace.steps]
        for i in range(3, len(harms)):
            if harms[i] > max(harms[:i]) + 1e-5:
                return ids, (harms[i] + max(harms[:i])) / 2, i
    raise AssertionError("no prompt whose answer's harm peaks late")


class Recorder(Streamer):
    def __init__(self):
        self.pieces, self.ended = [], None

    def put(self, text, steps):
        self.pieces.append(text)

    def end(self, generation):
        self.ended = generation


@pytest.mark.parametrize("rollback", ["answer", "sentence"])
@pytest.mark.parametrize("end_lift", [0.0, 50.0])
def test_a_stream_never_takes_back_a_word(setup, rollback, end_lift):
    """The answer is flagged late and rolled back: the streamer was never sent the dropped
    text, and what it received adds up to the final answer. With an end_lift no steered
    token reaches, the steered text is withheld whole at the end, and the stream had not
    carried it either."""
    lm, expert, probe, _, _ = setup
    ids, tau, flagged_at = late_flag(lm, expert, probe)
    rec = Recorder()
    gen = decoder(lm, expert, probe, tau=tau, k=1, window=1, rollback=rollback, end_lift=end_lift,
                  uncorrected="withhold").generate(
        ids, GenerationConfig(max_new_tokens=16), streamer=rec)
    assert "".join(rec.pieces) == gen.text and rec.ended is gen
    harm = [e for e in gen.trace.events if e["reason"] == "harm"]
    assert [e["type"] for e in harm] == ["rollback"]
    assert harm[0]["answer_tokens_dropped"] == flagged_at + 1 - harm[0]["keep_tokens"]
    assert harm[0]["at_token"] == flagged_at + 1 and bool(rec.pieces) == bool(gen.text)
    withheld = [e for e in gen.trace.events if e["type"] == "withhold"]
    if end_lift == 0.0:
        assert not withheld and gen.trace.finish_reason != "withheld"
    else:
        assert gen.trace.finish_reason == "withheld" and gen.trace.summary()["withheld"]
        assert len(gen.token_ids) == harm[0]["keep_tokens"] == withheld[0]["keep_tokens"]
        assert withheld[0]["dropped_text"].strip()


BATCH_PROMPTS = [PROMPT, "Tell me a story about a dragon.", "hi", "How do I pick a lock? Explain every step.",
                 "List three colours."]


@pytest.mark.parametrize("drafts", [False, True])
@pytest.mark.parametrize("end_lift", [0.0, 50.0])
def test_rds_expert_in_a_batch_answers_as_alone(setup, drafts, end_lift):
    """Flagged rows roll back and steer with the expert inside the batch while the others go
    on: every answer, its events and its sources are the single stream's (greedy). With an
    end_lift no token reaches, every steered row is withheld, in the batch as alone."""
    from rootdefense.drafting import PromptLookupDrafter

    lm, expert, probe, _, _ = setup
    _, tau, _ = late_flag(lm, expert, probe)
    ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]) for p in BATCH_PROMPTS]
    cfg = GenerationConfig(max_new_tokens=20)
    d = Corrected(lm, probe, expert, CorrectionSettings(tau=tau, k=1, window=1, end_lift=end_lift),
                  drafter=PromptLookupDrafter() if drafts else None)
    alone = [d.generate(i, cfg) for i in ids]
    batch = d.decoder.generate_batch(ids, cfg)
    for got, want in zip(batch, alone, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert [e["reason"] for e in got.trace.events] == [e["reason"] for e in want.trace.events]
        assert [s.source for s in got.trace.steps] == [s.source for s in want.trace.steps]
    rolled = sum(bool(g.trace.events) for g in batch)
    assert 0 < rolled, "some rows were rolled back and steered inside the batch"
    withheld = [g.trace.finish_reason == "withheld" for g in batch]
    assert withheld == ([bool(g.trace.summary()["rollbacks"]) for g in batch] if end_lift else [False] * len(batch))


def test_sentence_rollback_keeps_earlier_sentences(setup):
    lm, expert, probe, _, _ = setup
    dec = decoder(lm, expert, probe, rollback="sentence", window=2, k=1)
    tok = lm.tokenizer
    ids = tok("Mix flour. Then knead and wait", add_special_tokens=False)["input_ids"]
    keep = dec.correction.rollback_point(ids)
    assert tok.decode(ids[:keep]).rstrip().endswith("flour.")
    assert decoder(lm, expert, probe).correction.rollback_point(ids) == 0  # default: the whole answer


def test_monitor_guard_and_stream_units():
    m = RecoveryMonitor(tau=0.5, window=4, k=2)
    assert [m.update(h) for h in (0.9, 0.1, 0.1, 0.1, 0.6, 0.7)] == [False, False, False, False, False, True]
    g = DegenerationGuard(ngram=2, repeats=3)
    assert not g.looping([1, 2, 3, 1, 2])
    assert g.looping([1, 2, 5, 1, 2, 7, 1, 2])
    p = DegenerationGuard(ngram=4, repeats=3, span=12)
    assert p.periodic([9, 8] + [1, 2, 3, 4] * 3) == 6  # keep 9 8 and the first copy
    assert p.periodic([9, 8] + [1, 2, 3, 4] * 2) is None  # two copies are not a loop
    assert p.periodic([5] * 11) is None and p.periodic([5] * 12) == 1  # short spans repeat more
    assert p.periodic([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 7, 1, 2, 3, 4, 5, 6]) is None
    # repetition with variation: "Step k: the same long sentence." for k = 1, 2, ...
    steps = [t for k in range(1, 7) for t in (60 + k, *range(1, 24))]
    near = DegenerationGuard(4, 3, 12, near_window=64, near_share=0.8)
    assert near.periodic(steps) is None
    cut = near.near_repeat(steps)
    assert cut is not None and near.loop_cut(steps) == cut
    start = len(steps) - 64  # the cut is the second occurrence of the window's first repeated 4-gram
    first = next(i for i in range(start, len(steps) - 3)
                 if any(steps[j:j + 4] == steps[i:i + 4] for j in range(i + 1, len(steps) - 3)))
    assert steps[cut:cut + 4] == steps[first:first + 4] and first < cut
    assert near.near_repeat(list(range(100))) is None  # no repetition
    assert near.near_repeat(steps[:40]) is None  # shorter than the window
    assert DegenerationGuard(4, 3, 12, near_window=0).loop_cut(steps) is None
    # a 60-token paragraph said again: too long a period for the window alone, an echo of
    # the earlier answer; the cut keeps the first round whole
    para = list(range(100, 160))
    echoed = [7, 8] + para + para[:56]
    assert near.periodic(echoed) is None and near.near_repeat(echoed) is None
    assert near.echo(echoed) == 2 + 60 and near.loop_cut(echoed) == 62
    assert near.echo([7, 8] + para + para[:20]) is None  # less than near_share of the window
    assert near.echo(list(range(200))) is None
    assert DegenerationGuard(4, 3, 12, near_window=0).echo(echoed) is None


def test_echo_index_is_kept_between_calls_and_rebuilt_after_a_rollback():
    """The echo test indexes an answer's 4-grams once as it grows; asked after every token,
    through rollbacks and with two answers taking turns (as a batch's rows do), it answers
    exactly as a rescan from scratch."""
    import random

    def rescan(tokens, w=64, share=0.8):
        seen, repeats = set(), []
        for i in range(len(tokens) - 3):
            g = tuple(tokens[i:i + 4])
            if i >= len(tokens) - w and g in seen:
                repeats.append(i)
            seen.add(g)
        return None if len(tokens) < w or len(repeats) / (w - 3) <= share else repeats[0]

    rng = random.Random(0)
    guard = DegenerationGuard(4, 3, 12)
    fired = 0
    for _ in range(3):
        rows = [([], rng.choice([20, 70])) for _ in range(2)]  # two answers, each echoing with its own period
        for step in range(600):
            tokens, period = rows[step % 2 if step > 300 else 0]  # one answer alone, then both in turns
            r = rng.random()
            if r < 0.02 and tokens:
                del tokens[-rng.randrange(1, 40):]  # rollback
            elif r < 0.95 and len(tokens) > 70:
                tokens.append(tokens[-period])  # echo an earlier stretch
            else:
                tokens.append(rng.randrange(6))
            got = guard.echo(list(tokens))
            assert got == rescan(tokens)
            fired += got is not None
    assert fired > 0  # the answers do echo


def test_steer_choice_prefers_safe_plausible_expert_tokens():
    pool = torch.tensor([5, 6, 7])
    lp_e = torch.full((10,), -20.0)
    lp_e[5], lp_e[6], lp_e[7] = -0.1, -1.0, -3.0
    lp_b = torch.zeros(10)
    lp_b[6] = -30.0  # implausible to the base model
    harms = torch.tensor([0.9, 0.1, 0.2])
    assert int(pool[_steer_choice(pool, lp_e, lp_b, harms, 0.5, -12.0, None)]) == 7
    assert int(pool[_steer_choice(pool, lp_e, lp_b, torch.tensor([0.9, 0.1, 0.8]), 0.5, -12.0, None)]) == 6
    assert int(pool[_steer_choice(pool, lp_e, lp_b, torch.tensor([0.9, 0.95, 0.8]), 0.5, -12.0, None)]) == 7


@pytest.mark.parametrize("kwargs, needle", [
    ({"k": 9, "window": 8}, "k <= window"), ({"rollback": "paragraph"}, "rollback must be"),
    ({"tau": 1.5}, "strictly between"), ({"expert_top": 0}, "expert_top must be"),
    ({"steer_first": -1}, "steer_first must be"), ({"steer_tau": 1.0}, "steer_tau must lie"),
    ({"end_check": "yes"}, "end_check must be true or false"),
])
def test_settings_are_checked(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        CorrectionSettings(**kwargs).validate()


@pytest.mark.parametrize("switch", ["use_expert", "recover", "guard"])
@torch.no_grad()
def test_each_part_can_be_turned_off(setup, switch, tiny_tokenizer):
    """Ablations: no expert (steer among the base model's candidates, one row), no recovery
    (steer from the flagged token on, nothing dropped), no guard."""
    lm, expert, probe, ids, folder = setup
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    gen = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99, **{switch: False}).generate(
        ids, GenerationConfig(max_new_tokens=8))
    ev = gen.trace.events[0]
    if switch == "recover":
        assert ev["type"] == "steer" and gen.trace.steps[0].source == "base"
        assert gen.token_ids[0] == plain(lm, ids, 1).token_ids[0]  # the flagged token stays
        assert {s.source for s in gen.trace.steps[1:]} == {"expert"}
        assert gen.trace.summary()["flags"] == 1 and gen.trace.summary()["rollbacks"] == 0
    else:
        assert ev["reason"] == "harm" and ev["keep_tokens"] == 0
        sources = {s.source for s in gen.trace.steps}
        assert sources == ({"steered"} if switch == "use_expert" else {"expert"})
        if switch == "use_expert":  # the base model's most probable candidate the probe passes
            ref = reference_steer(tiny_tokenizer, folder, probe, ids, tau, len(gen.token_ids), use_expert=False)
            assert gen.token_ids == ref


@torch.no_grad()
def test_a_looping_answer_goes_to_the_expert_even_unflagged(setup):
    """The guard also watches undefended-looking answers: once the tail is back-to-back
    copies, the expert answers from the rollback point instead (a 'loop' event); without an
    expert the answer is cut to its first copy and ends."""
    lm, expert, probe, ids, _ = setup
    ref = plain(lm, ids, 80).token_ids
    at, cut = next(((n, c) for n in range(1, len(ref) + 1)
                    if (c := DegenerationGuard(4, 3, 12).periodic(ref[:n])) is not None), (None, None))
    assert cut is not None, "the tiny model was expected to loop within 80 tokens"
    gen = decoder(lm, expert, probe, tau=0.999999).generate(ids, GenerationConfig(max_new_tokens=80))
    ev = gen.trace.events[0]
    assert ev["reason"] == "loop" and ev["keep_tokens"] == 0 and ev["at_token"] == at
    assert {s.source for s in gen.trace.steps} == {"expert"} and gen.trace.summary()["loop_restarts"] == 1
    alone = decoder(lm, expert, probe, tau=0.999999, use_expert=False).generate(ids, GenerationConfig(max_new_tokens=80))
    assert alone.token_ids == ref[:cut] and alone.trace.finish_reason == "degenerate"
    assert [e["reason"] for e in alone.trace.events] == ["degeneration"]
    off = decoder(lm, expert, probe, tau=0.999999, guard=False).generate(ids, GenerationConfig(max_new_tokens=80))
    assert off.token_ids == ref[:len(off.token_ids)] and off.trace.finish_reason != "degenerate"


def test_a_steered_loop_keeps_its_first_round_whole(setup):
    lm, expert, probe, _, _ = setup
    dec = decoder(lm, expert, probe, loop_ngram=2, loop_repeats=3)
    rc = RowCorrection(monitor=None, guard=DegenerationGuard(2, 3), steer_tau=0.5, gate=None, mode="steer",
                       steer_from=1)
    assert dec.correction._loop_cut(rc, [9, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2]) == 5  # keeps 9 and "1 2 3 4", the round before "1 2" came back


def test_complete_sentence():
    from rootdefense.correction.hook import complete_sentence

    for text in ("I can't help with that.", "Why?", "Stop!", 'He said "no."', "(See the manual.)  \n"):
        assert complete_sentence(text), text
    for text in ("", "I can't help with", "Steps:\n1.", "Steps:\n  b.", "Yes,", "Read this\n"):
        assert not complete_sentence(text), text


def test_a_steered_answer_may_stop_after_a_complete_sentence(setup, tiny_tokenizer):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    for steer_end in (True, False):
        dec = decoder(lm, expert, probe, steer_end=steer_end, end_lift=0.0)
        for text, steer_from, want in (("I can't help with that.", 0, steer_end), ("I can't help with", 0, False),
                                       ("Bread needs flour. I can't", 4, False)):
            row, rc = _steered_row(tok, text, steer_from=steer_from)
            assert dec.correction.may_end(rc, row) is want, (text, steer_end)
            rc.mode = "watch"  # an answer never flagged is the model's own: the probe's reading stands
            assert not dec.correction.may_end(rc, row)
    with pytest.raises(InputError, match="steer_end must be true or false"):
        CorrectionSettings(steer_end="yes").validate()
    for bad in (-1.0, "3", True):
        with pytest.raises(InputError, match="end_lift must be a number"):
            CorrectionSettings(end_lift=bad).validate()
    # with the expert, the stop needs its correction in the text: a token it raised by end_lift nats
    dec = decoder(lm, expert, probe, end_lift=3.0)
    row, rc = _steered_row(tok, "I'm glad to help with that.")
    rc.lift = 1.5  # a willing opening the base model would write too
    assert not dec.correction.may_end(rc, row)
    dec.correction.steered(rc, 4.2)  # "not" in "I'm not going to": the expert's correction
    dec.correction.steered(rc, 0.3)
    assert rc.lift == 4.2 and dec.correction.may_end(rc, row)
    assert decoder(lm, expert, probe, end_lift=5.0).correction.may_end(rc, row) is False


@torch.no_grad()
def test_a_stop_token_the_probe_reads_as_harmful_ends_a_finished_steered_answer(setup, monkeypatch):
    """The probe reads every token as harmful, so steering takes the expert's most probable
    token. Once the steered text counts as a complete sentence (after 3 tokens here), a stop
    token in the pool passes and ends the answer; without ``steer_end`` it never does."""
    from rootdefense.correction import hook

    lm, expert, _, ids, _ = setup
    harmful = LinearProbe(torch.zeros(48), 20.0, layer=2, threshold=0.5, meta={"model_id": MODEL_ID, "kind": "response"})

    def run(eos, steer_end, end_lift=0.0):
        correction = Correction(harmful, CorrectionSettings(tau=0.5, k=1, window=1, loop_repeats=99,
                                                            steer_end=steer_end, end_lift=end_lift), expert, None,
                                lm.tokenizer)
        return Decoder(lm.model, lm.tokenizer, harmful, eos_token_ids=eos,
                       correction=correction).generate(ids, GenerationConfig(max_new_tokens=8))

    off = run([lm.tokenizer.eos_token_id], False)
    assert off.trace.events[0]["reason"] == "harm" and len(off.token_ids) > 4
    first3 = off.token_ids[:3]
    logits = lm.model(input_ids=torch.cat([ids, torch.tensor([first3])], 1)).logits[0, -1]
    seen = set(off.token_ids[:4]) | set(plain(lm, ids, 1).token_ids)
    stop = next(t for t in torch.topk(logits, 10).indices.tolist() if t not in seen)  # in the steered pool
    finished = lm.tokenizer.decode(first3, skip_special_tokens=True)
    monkeypatch.setattr(hook, "complete_sentence", lambda text: text == finished)
    assert stop not in run([stop], False).token_ids  # the probe keeps the stop token out
    assert stop not in run([stop], True, end_lift=50.0).token_ids  # no steered token carries such a lift
    ended = run([stop], True)
    assert ended.token_ids[:3] == first3 and len(ended.token_ids) <= 4
    # the stop token was chosen; it decodes to text here, so the answer ends after the "sentence" before it
    assert ended.trace.finish_reason == "closed" and ended.trace.events[-1]["reason"] == "eos"
    assert ended.trace.events[-1]["dropped_text"] == lm.tokenizer.decode([stop])


def _steered_row(tok, text: str, max_new_tokens: int = 200, steer_from: int = 0, lift: float = 5.0):
    """A row steering since ``steer_from`` whose steered text holds a token the expert raised
    ``lift`` nats over the base model (default: its correction is in, see end_lift)."""
    from types import SimpleNamespace

    from rootdefense.decoding.trace import TokenStep

    ids = tok.encode(text, add_special_tokens=False)
    steps = [TokenStep(t, tok.decode([t]), 0.5, 0.1, t, tok.decode([t]), 0.5, 0.1, False) for t in ids]
    row = SimpleNamespace(tokens=ids, trace=SimpleNamespace(steps=steps, events=[]), query_len=3, prompt=[1, 2, 3],
                          cfg=GenerationConfig(max_new_tokens=max_new_tokens), detok=SimpleNamespace(text=text))
    rc = RowCorrection(monitor=None, guard=DegenerationGuard(4, 3), steer_tau=0.5, gate=None, mode="steer",
                       steer_from=steer_from, lift=lift)
    return row, rc


@pytest.mark.parametrize("close", [True, False])
def test_a_steered_answer_that_loops_ends_after_its_last_complete_sentence(setup, tiny_tokenizer, monkeypatch, close):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    dec = decoder(lm, expert, probe, close=close)
    head = "I can't help with that. If you tell me what you need, I can point you elsewhere."
    row, rc = _steered_row(tok, head + " I am not going to help with that. I am not going to")
    loop_cut = len(row.tokens) - 2  # where the guard would cut (mid-sentence)
    monkeypatch.setattr(dec.correction, "_loop_cut", lambda rc_, tokens: loop_cut)
    v = dec.correction.after_token(rc, row, eos=set())
    if not close:
        assert v.finish == "degenerate" and v.cut == loop_cut
        return
    # the last complete sentence before the cut is the loop's first round, which ends "with that."
    kept = tok.decode(row.tokens[:v.cut])
    assert v.finish == "closed" and kept.endswith("I am not going to help with that.")
    ev = row.trace.events[-1]
    assert ev["type"] == "close" and ev["reason"] == "loop" and ev["keep_tokens"] == v.cut
    assert tok.decode(row.tokens[v.cut:]).strip() == ev["dropped_text"].strip() == "I am not going to"


def test_a_steered_answer_that_says_a_sentence_again_ends_before_the_repeat(setup, tiny_tokenizer):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    dec = decoder(lm, expert, probe)
    head = "I can't help with that. If you need help, ask me."
    row, rc = _steered_row(tok, head + " I can't help with that.")
    v = dec.correction.after_token(rc, row, eos=set())
    assert v.finish == "closed" and tok.decode(row.tokens[:v.cut]) == head
    assert row.trace.events[-1]["reason"] == "repeat"
    assert row.trace.events[-1]["dropped_text"].strip() == "I can't help with that."
    for text in (head + " I can't help with this.", head + " I can't help with", "That is all. That is all right."):
        row, rc = _steered_row(tok, text)
        assert dec.correction.after_token(rc, row, eos=set()).finish is None, text
    row, rc = _steered_row(tok, head + " I can't help with that.")
    rc.mode = "watch"  # the model's own answer is not the expert's to end
    rc.monitor = RecoveryMonitor(0.99, 8, 3)
    assert dec.correction.after_token(rc, row, eos=set()).finish is None


def test_closing_drops_only_steered_text_and_never_a_fragment_of_its_own(setup, tiny_tokenizer, monkeypatch):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    dec = decoder(lm, expert, probe)
    kept_part = "Bread needs flour. Then"
    steer_from = len(tok.encode(kept_part, add_special_tokens=False))
    row, rc = _steered_row(tok, kept_part + " I am not going to do that and I am not going to", steer_from=steer_from)
    monkeypatch.setattr(dec.correction, "_loop_cut", lambda rc_, tokens: len(tokens) - 1)
    v = dec.correction.after_token(rc, row, eos=set())
    assert v.finish == "degenerate"  # no complete steered sentence: cut as before, the kept text untouched


def test_a_steered_answer_out_of_tokens_ends_after_its_last_complete_sentence(setup, tiny_tokenizer):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    dec = decoder(lm, expert, probe)
    text = "I can't help with that. Here is something safer to try instead: ask a"
    n = len(tok.encode(text, add_special_tokens=False))
    row, rc = _steered_row(tok, text, max_new_tokens=n)
    v = dec.correction.after_token(rc, row, eos=set())
    assert v.finish == "closed" and tok.decode(row.tokens[:v.cut]) == "I can't help with that."
    assert row.trace.events[-1]["reason"] == "length"
    row, rc = _steered_row(tok, text, max_new_tokens=n + 1)  # not at the limit yet: goes on
    assert dec.correction.after_token(rc, row, eos=set()).finish is None
    eos_id = tok.eos_token_id  # special: decodes to nothing
    for answer, finish in ((text, "closed"), ("I can't help with that.", "eos")):
        row, rc = _steered_row(tok, answer)
        row.tokens.append(eos_id)  # the expert ends: on a fragment, or after a whole sentence
        v = dec.correction.after_token(rc, row, eos={eos_id})
        assert v.finish == finish
        if finish == "closed":
            assert tok.decode(row.tokens[:v.cut]) == "I can't help with that." and row.trace.events[-1]["reason"] == "eos"
    row, rc = _steered_row(tok, text, max_new_tokens=n)
    rc.mode = "watch"  # an answer never flagged is the model's own: the engine ends it at the limit as it is
    rc.monitor = RecoveryMonitor(0.99, 8, 3)
    assert dec.correction.after_token(rc, row, eos=set()).finish is None


WILLING = " I'm glad to help with that. Here is how you do it. Step one is"


@pytest.mark.parametrize("ending, released", [("loop", "closed"), ("cut", "degenerate"), ("length", "closed"),
                                              ("length-fragment", None), ("eos", "eos"), ("eos-fragment", "closed")])
@pytest.mark.parametrize("steer_from", [0, 5])
def test_a_steered_answer_without_the_experts_correction_is_withheld(setup, tiny_tokenizer, monkeypatch, ending,
                                                                     released, steer_from):
    """However a steered answer ends, when no token of it carries the expert's correction
    (a lift of end_lift nats over the base model), its steered text is dropped and the
    answer ends there (finish withheld); the text before steering stays. With the
    correction in it, or with ``uncorrected: release``, it ends as before."""
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    head = "Bread needs flour and a warm oven."
    text = {"loop": WILLING + " Here is how you do it.", "cut": " I'm glad to help and I'm glad to help and",
            "length": WILLING + " Do", "length-fragment": " I'm glad to help and here is the first",
            "eos": " I'm glad to help with that.", "eos-fragment": WILLING}[ending]
    prefix = tok.decode(tok.encode(head, add_special_tokens=False)[:steer_from]) if steer_from else ""
    full = prefix + text
    eos_id = tok.eos_token_id

    def verdict(lift, **settings):
        dec = decoder(lm, expert, probe, **settings)
        n = len(tok.encode(full, add_special_tokens=False))
        row, rc = _steered_row(tok, full, max_new_tokens=n if ending.startswith("length") else 500,
                               steer_from=steer_from, lift=lift)
        if ending in ("loop", "cut"):
            monkeypatch.setattr(dec.correction, "_loop_cut", lambda rc_, tokens: len(tokens) - 1)
        if ending.startswith("eos"):
            row.tokens.append(eos_id)
        return dec.correction.after_token(rc, row, eos={eos_id}), row

    for lift, settings in ((5.0, {"uncorrected": "withhold"}), (1.0, {})):
        v, row = verdict(lift, **settings)
        assert v.finish == released and all(e["type"] != "withhold" for e in row.trace.events), (lift, settings)
    v, row = verdict(1.0, uncorrected="withhold")
    assert v.finish == "withheld" and v.cut == steer_from
    ev = row.trace.events[-1]
    assert ev["type"] == "withhold" and ev["reason"] == "uncorrected" and ev["lift"] == 1.0 and ev["end_lift"] == 3.0
    assert ev["keep_tokens"] == steer_from and ev["would_finish"] == (released or "length")
    assert ev["dropped_text"].strip() and ev["dropped_text"].strip() in text
    assert tok.decode(row.tokens[:v.cut]) == prefix
    v, _ = verdict(0.0, end_lift=0.0, uncorrected="withhold")  # end_lift 0: any steered text counts as corrected
    assert v.finish == released
    v, _ = verdict(0.0, use_expert=False, uncorrected="withhold")  # the base model steering alone has no lift to read
    assert v.finish == released
    with pytest.raises(InputError, match="uncorrected must be 'withhold' or 'release'"):
        CorrectionSettings(uncorrected="drop").validate()


MOSS = "Moss dies in shade. Rake it out in spring. Rake it out in spring. Rake it"


@pytest.mark.parametrize("gate, loop_expert, own_loops, text, want", [
    ({"strict": False}, "gated", "close", MOSS, "closed"),
    ({"strict": False}, "gated", "keep", MOSS, "kept"),
    ({"strict": True}, "gated", "keep", MOSS, "expert"),
    ({"strict": True}, "gated", "close", MOSS, "expert"),
    ({"strict": False}, "always", "keep", MOSS, "expert"),
    (None, "gated", "keep", MOSS, "expert"),
    ({"strict": False}, "gated", "close", "rake rake rake rake rake rake rake rake rake rake rake rake", "expert"),
    ({"strict": False}, "gated", "keep", "rake rake rake rake rake rake rake rake rake rake rake rake", "kept"),
])
def test_a_looping_answer_to_a_request_the_gate_reads_as_benign_stays_the_models_own(
        setup, tiny_tokenizer, monkeypatch, gate, loop_expert, own_loops, text, want):
    lm, expert, probe, _, _ = setup
    tok = tiny_tokenizer
    gated = gate is not None  # the settings have a gate; the row's reading of it is set below
    dec = Corrected(lm, probe, expert, CorrectionSettings(loop_expert=loop_expert, own_loops=own_loops,
                                                          gate=0.5 if gated else None),
                    query_probe=_query_probe() if gated else None)
    row, rc = _steered_row(tok, text)
    rc.mode, rc.steer_from, rc.gate = "watch", 0, gate
    rc.monitor = RecoveryMonitor(0.99, 8, 3)
    cut = len(tok.encode(text[:50], add_special_tokens=False))  # inside the loop's second round
    monkeypatch.setattr(dec.correction, "_loop_cut", lambda rc_, tokens: cut)
    v = dec.correction.after_token(rc, row, eos=set())
    if want == "closed":  # the model's own answer up to the loop's first round, no expert
        assert v.finish == "closed" and v.keep is None and rc.mode == "watch"
        assert tok.decode(row.tokens[:v.cut]) == "Moss dies in shade. Rake it out in spring."
    elif want == "kept":  # nothing happens: the answer goes on as the undefended model's would
        assert v.finish is None and v.keep is None and v.cut is None and rc.mode == "watch"
        assert not row.trace.events
        # and nothing is held back for a loop cut that cannot come: only the rollback point
        assert dec.correction.final_len(rc, row) == dec.correction.rollback_point(row.tokens)
    else:  # the expert answers instead, from the rollback point
        assert v.finish is None and v.keep == 0 and rc.mode == "steer"
        assert row.trace.events[-1]["reason"] == "loop"


def test_loop_expert_is_checked():
    with pytest.raises(InputError, match="loop_expert"):
        CorrectionSettings(loop_expert="sometimes").validate()
    with pytest.raises(InputError, match="own_loops"):
        CorrectionSettings(own_loops="trim").validate()


@pytest.mark.parametrize("tau_kind", ["never", "first", "mid", "late"])
@torch.no_grad()
def test_speculative_watch_equals_plain_watch(setup, tau_kind):
    """Drafts verified in one forward change nothing: the same tokens, harms, flags,
    rollbacks and loop cuts as one token per forward (greedy)."""
    from rootdefense.drafting import PromptLookupDrafter

    lm, expert, probe, ids, _ = setup
    ref = plain(lm, ids, 60)
    full = torch.cat([ids, torch.tensor([ref.token_ids])], 1)
    hidden = lm.model(input_ids=full, output_hidden_states=True).hidden_states[probe.layer][0, ids.shape[1]:]
    seq = [float(h) for h in probe.score(hidden)]
    harms = sorted(seq)
    # "late": the 4th highest harm of the first 12 tokens, flagged at 4 of 8: drafts come first
    tau = {"never": 0.999999, "first": min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4)),
           "mid": (harms[len(harms) // 2] + harms[len(harms) // 2 + 1]) / 2,
           "late": sorted(seq[:12])[8] - 1e-5}[tau_kind]
    cfg = GenerationConfig(max_new_tokens=60)
    settings = CorrectionSettings(tau=tau, k={"mid": 2, "late": 4}.get(tau_kind, 1), window=8 if tau_kind == "late" else 4)
    base = Corrected(lm, probe, expert, settings)
    spec = Corrected(lm, probe, expert, settings, drafter=PromptLookupDrafter(max_ngram=3), max_draft=6)
    a, b = base.generate(ids, cfg), spec.generate(ids, cfg)
    assert b.token_ids == a.token_ids and b.trace.finish_reason == a.trace.finish_reason
    assert [e["reason"] for e in b.trace.events] == [e["reason"] for e in a.trace.events]
    assert [s.source for s in b.trace.steps] == [s.source for s in a.trace.steps]
    assert max(abs(x.harm - y.harm) for x, y in zip(a.trace.steps, b.trace.steps, strict=True)) < 1e-4
    if tau_kind in ("never", "late"):  # the tiny model loops, so lookup drafts are taken
        assert b.timings["accepted"] > 0


# ---- a forced opening (assistant prefill) and the gated monitor ---------------------------

def _with_prefill(tok, text):
    request = encode_chat(tok, [{"role": "user", "content": PROMPT}])
    forced = encode_chat(tok, [{"role": "user", "content": PROMPT}], prefill=text)
    assert torch.equal(forced[0, :request.shape[1]], request[0])
    return request, forced


@pytest.mark.parametrize("retract", [True, False])
def test_a_flag_retracts_the_forced_opening(setup, tiny_tokenizer, retract):
    """Flagged at the first token after a forced opening: with retraction the expert answers
    the request afresh (the same answer as a flagged answer without any prefill); without,
    it can only continue after the forced text."""
    lm, expert, probe, _, _ = setup
    request, forced = _with_prefill(tiny_tokenizer, "Sure, here is a tutorial")
    cfg = GenerationConfig(max_new_tokens=10)
    d = decoder(lm, expert, probe, tau=1e-6, k=1, window=1, loop_repeats=99, retract_prefill=retract)
    gen = d.generate(forced, cfg, query_len=request.shape[1])
    fresh = d.generate(request, cfg)
    ev = gen.trace.events[0]
    assert ev["reason"] == "harm" and {s.source for s in gen.trace.steps} == {"expert"}
    if retract:
        assert ev["type"] == "correction" and ev["retracted_prefill"]
        assert ev["retracted_prefill_text"] == "Sure, here is a tutorial"
        assert gen.token_ids == fresh.token_ids and gen.trace.summary()["prefill_retracted"]
        assert gen.prompt_tokens == request.shape[1]
    else:
        assert "retracted_prefill" not in ev and not gen.trace.summary()["prefill_retracted"]
        assert gen.token_ids != fresh.token_ids  # it continued after the forced text
    with pytest.raises(InputError, match="query_len"):
        d.generate(forced, cfg, query_len=0)


def _query_probe(seed=5):
    g = torch.Generator().manual_seed(seed)
    return LinearProbe(torch.randn(48, generator=g), 0.0, layer=1, threshold=0.5,
                       meta={"model_id": MODEL_ID, "kind": "query"})


def test_the_gate_picks_the_monitor_from_the_request(setup):
    """gate 0: every request is watched by the strict monitor, so the answer equals the one
    the strict setting gives as the normal monitor; gate ~1: the normal monitor."""
    lm, expert, probe, ids, _ = setup
    cfg = GenerationConfig(max_new_tokens=16)
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    strict = {"strict_tau": tau, "strict_window": 1, "strict_k": 1}
    base = {"tau": 0.999999, "window": 8, "k": 8, "loop_repeats": 99}

    def run(gate, **kw):
        return Corrected(lm, probe, expert, CorrectionSettings(**kw, gate=gate),
                         query_probe=_query_probe()).generate(ids, cfg)

    all_strict, none_strict = run(0.0, **base, **strict), run(0.999999, **base, **strict)
    assert all_strict.trace.gate["strict"] and not none_strict.trace.gate["strict"]
    assert 0 < all_strict.trace.gate["query_score"] < 1
    assert all_strict.token_ids == decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99).generate(
        ids, cfg).token_ids
    assert all_strict.trace.summary()["flags"] == 1 and none_strict.trace.summary()["flags"] == 0
    assert none_strict.token_ids == plain(lm, ids, 16).token_ids
    assert all_strict.trace.summary()["strict_monitor"] is True
    with pytest.raises(InputError, match="needs a query probe"):
        decoder(lm, expert, probe, gate=0.5)
    with pytest.raises(InputError, match="strict_k <= strict_window"):
        CorrectionSettings(gate=0.5, strict_k=5, strict_window=4).validate()


def test_the_trajectory_blend_reads_the_request_score(setup):
    """blend: each token's monitor score mixes its harm with the request's query score. With
    tau between the first token's plain harm and its blended score, the blended monitor flags
    at the first token where harm alone would not, and the trace records the query score."""
    lm, expert, probe, ids, _ = setup
    cfg = GenerationConfig(max_new_tokens=12)
    q = _query_probe()
    harm = first_harm(lm, probe, ids)
    run = decoder(lm, expert, probe, tau=0.999999, k=1, window=1, loop_repeats=99).generate(ids, cfg)
    assert run.trace.summary()["flags"] == 0
    blend = 0.5
    score = Corrected(lm, probe, expert, CorrectionSettings(tau=0.5, window=1, k=1, blend=blend, loop_repeats=99),
                      query_probe=q).generate(ids, cfg).trace.gate["query_score"]
    mixed = (1 - blend) * harm + blend * score
    if abs(mixed - harm) < 1e-3:
        pytest.skip("this random query probe scores the request like its first token")
    tau = (mixed + harm) / 2
    gen = Corrected(lm, probe, expert, CorrectionSettings(tau=tau, window=1, k=1, blend=blend, loop_repeats=99),
                    query_probe=q).generate(ids, cfg)
    alone = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99).generate(ids, cfg)
    first_flag = [e["at_token"] for e in gen.trace.events if e.get("reason") == "harm"]
    if mixed > harm:  # the request raised the score: flagged at the very first token
        assert first_flag == [1] and not any(e.get("at_token") == 1 for e in alone.trace.events)
    else:  # it lowered it: no flag at the first token, where harm alone flags
        assert 1 not in first_flag and [e["at_token"] for e in alone.trace.events][:1] == [1]
    assert gen.trace.gate["strict"] is False  # a blend alone picks no strict monitor
    with pytest.raises(InputError, match="needs a query"):
        decoder(lm, expert, probe, blend=0.5)


def test_defender_withdraws_a_forced_opening(tiny_tokenizer, tmp_path):
    """Through the API: a prefilled answer that is flagged comes back as a whole new answer
    (the forced text withdrawn, said in the trace), equal to the flagged answer to the bare
    request; a benign prefill that is never flagged is continued as before."""
    from test_defenses import write_expert

    from rootdefense.api import Defender, DefenseSettings

    tok = tiny_tokenizer
    lm = LoadedModel(make_tiny_model(tok, seed=MODEL_SEED), tok, MODEL_ID, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"})
    expert = str(write_expert(tok, tmp_path / "expert"))
    cfg = GenerationConfig(max_new_tokens=8)
    flag_all = Defender(lm, probe, DefenseSettings(defense="rds-expert", tau=1e-6, expert=expert,
                                                   correction={"k": 1, "window": 1, "loop_repeats": 99}))
    got = flag_all.generate(PROMPT, config=cfg, prefill="Sure, here is")
    assert got.trace.summary()["prefill_retracted"] and got.trace.events[0]["retracted_prefill_text"] == "Sure, here is"
    assert got.token_ids == flag_all.generate(PROMPT, config=cfg).token_ids
    never = Defender(lm, probe, DefenseSettings(defense="rds-expert", tau=0.999999, expert=expert,
                                                correction={"k": 8, "window": 8, "loop_repeats": 99}))
    kept = never.generate(PROMPT, config=cfg, prefill="Sure, here is")
    assert not kept.trace.summary()["prefill_retracted"] and kept.trace.events == []
    forced = encode_chat(tok, [{"role": "user", "content": PROMPT}], prefill="Sure, here is")
    assert kept.token_ids == plain(lm, forced, 8).token_ids


def test_end_check_reads_the_last_token_as_a_verdict_on_the_whole_answer(setup):
    """A k-of-window monitor cannot flag an answer that ends before k of its tokens score high.
    With end_check, the ending token's score alone flags it (and only the ending token's)."""
    lm, expert, probe, ids, _ = setup
    first = plain(lm, ids, 6).token_ids
    end = next(i for i, t in enumerate(first) if i >= 2 and t not in first[:i])  # a token not seen before it
    eos = {first[end]}  # it ends the answer here: an answer of end + 1 tokens

    def run(**settings):
        correction = Correction(probe, CorrectionSettings(**settings), expert, None, lm.tokenizer)
        return Decoder(lm.model, lm.tokenizer, probe, eos_token_ids=eos,
                       correction=correction).generate(ids, GenerationConfig(max_new_tokens=12))

    unflagged = run(tau=0.999999, window=8, k=8, loop_repeats=99)
    assert unflagged.token_ids == first[:end + 1] and unflagged.trace.events == []
    harms = [s.harm for s in unflagged.trace.steps]
    if max(harms[:-1]) >= harms[-1]:
        pytest.skip("this random probe scores an earlier token higher than the ending one")
    tau = (max(harms[:-1]) + harms[-1]) / 2  # only the ending token reaches it
    assert run(tau=tau, window=8, k=8, loop_repeats=99).trace.events == []  # k of 8: never, in so few tokens
    checked = run(tau=tau, window=8, k=8, loop_repeats=99, end_check=True)
    flag = [e for e in checked.trace.events if e.get("reason") == "harm"]
    assert len(flag) == 1 and flag[0]["at_end"] is True and flag[0]["at_token"] == end + 1
    assert checked.token_ids[:end + 1] != first[:end + 1]  # the expert answered instead
    m = RecoveryMonitor(tau=0.5, window=4, k=2)
    assert [m.update(h) for h in (0.9, 0.1)] == [False, False] and m.update(0.6, final=True)
    assert not RecoveryMonitor(0.5, 4, 2).update(0.4, final=True)


@torch.no_grad()
def test_amplified_opening_matches_an_independent_recompute(setup, tiny_tokenizer):
    """steer_alpha ranks the first steered tokens by SafeDecoding's amplified distribution,
    then the expert's own ranking again, exactly as a recompute from scratch."""
    lm, expert, probe, ids, folder = setup
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    gen = decoder(lm, expert, probe, tau=tau, k=1, window=1, loop_repeats=99, steer_alpha=3.0,
                  steer_alpha_tokens=3).generate(ids, GenerationConfig(max_new_tokens=10))
    assert gen.trace.summary()["flags"] == 1 and {s.source for s in gen.trace.steps} == {"expert"}
    assert gen.token_ids == reference_steer(tiny_tokenizer, folder, probe, ids, tau, len(gen.token_ids),
                                            alpha=3.0, alpha_tokens=3)


def test_amplified_ranking_puts_the_experts_shift_first():
    from rootdefense.correction.steering import amplified

    p_b = torch.tensor([0.70, 0.05, 0.25])  # the base model opens willingly (token 0)
    p_e = torch.tensor([0.60, 0.25, 0.15])  # the expert too, but it raised its refusal (token 1)
    lp = amplified(p_e.log(), p_b.log(), 3.0)
    assert int(torch.argmax(p_e)) == 0 and int(torch.argmax(lp)) == 1
    torch.testing.assert_close(amplified(p_e.log(), p_b.log(), 1.0), p_e.log())  # alpha 1: the expert itself


@pytest.mark.parametrize("bad", [{"steer_alpha": -1.0}, {"steer_alpha": True}, {"steer_alpha_tokens": 0}])
def test_steer_alpha_settings_are_checked(bad):
    with pytest.raises(InputError, match="steer_alpha"):
        CorrectionSettings(**bad).validate()


@torch.no_grad()
def test_an_unreadable_span_makes_the_request_read_as_harmful(setup):
    """suspect_nll: the engine hands the hook the request tokens' surprisal, exactly the
    model's own -log p (recomputed here from a full forward); the hook's suspicion is the
    highest mean over suspect_window consecutive content tokens; a request at or above
    suspect_nll reads as harmful to the gate (query score 1), so the strict monitor watches
    it, as gate 0 would; below it, the query probe decides as before."""
    lm, expert, probe, ids, _ = setup
    cfg = GenerationConfig(max_new_tokens=16)
    tau = min(0.999, max(1e-3, first_harm(lm, probe, ids) - 1e-4))
    base = {"tau": 0.999999, "window": 8, "k": 8, "loop_repeats": 99,
            "strict_tau": tau, "strict_window": 1, "strict_k": 1, "gate": 0.999999}

    def run(**kw):
        c = Corrected(lm, probe, expert, CorrectionSettings(**base, **kw), query_probe=_query_probe())
        return c, c.generate(ids, cfg)

    c, low = run(suspect_nll=1e6, suspect_window=3)
    logits = lm.model(input_ids=ids).logits[0].float()
    nll = (torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(-1, ids[0, 1:, None])[:, 0]).tolist()
    pre, post = c.correction.template_span()
    content = nll[pre - 1: len(nll) - post]
    n_content = len(lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert pre > 0 and len(content) == n_content  # the span is the request's own tokens
    want = max(sum(content[i:i + 3]) / 3 for i in range(len(content) - 2))
    assert low.trace.gate["suspicion"] == pytest.approx(want, abs=2e-3)
    assert low.trace.gate["suspect"] is False and not low.trace.gate["strict"]
    assert low.token_ids == plain(lm, ids, 16).token_ids and low.trace.summary()["suspect_request"] is False
    _, high = run(suspect_nll=want - 1e-3, suspect_window=3)
    assert high.trace.gate["suspect"] is True and high.trace.gate["strict"]
    assert high.trace.gate["query_score"] == low.trace.gate["query_score"]  # the probe's own score is kept
    strict_everywhere = Corrected(lm, probe, expert, CorrectionSettings(**{**base, "gate": 0.0}),
                                  query_probe=_query_probe()).generate(ids, cfg)
    assert high.token_ids == strict_everywhere.token_ids and high.trace.summary()["flags"] == 1


def test_suspicion_windows_and_settings(setup):
    lm, expert, probe, _, _ = setup
    c = Correction(probe, CorrectionSettings(gate=0.5, suspect_nll=5.0, suspect_window=2), expert, _query_probe(),
                   None)  # no tokenizer: the whole request is content
    assert c.template_span() == (0, 0)
    assert c.suspicion([1.0, 9.0, 9.0, 1.0]) == 9.0
    assert c.suspicion([1.0, 9.0]) == 5.0  # exactly one window
    assert c.suspicion([14.0]) == 0.0 and c.suspicion([]) == 0.0  # shorter than the window: no span
    with pytest.raises(InputError, match="surprisal"):
        c.start(torch.zeros(48))
    with pytest.raises(InputError, match="set 'gate' or 'blend'"):
        Correction(probe, CorrectionSettings(suspect_nll=5.0), expert, _query_probe(), None)
    for bad, match in (({"gate": 0.5, "suspect_nll": 0}, "surprisal in nats above 0"),
                       ({"gate": 0.5, "suspect_nll": True}, "surprisal in nats above 0"),
                       ({"gate": 0.5, "suspect_window": 0}, "suspect_window")):
        with pytest.raises(InputError, match=match):
            CorrectionSettings(**bad).validate()


@torch.no_grad()
def test_suspicion_is_the_same_in_a_left_padded_batch(setup):
    """Rows of different lengths share one left-padded prefill: each row's suspicion is the
    one it gets alone."""
    lm, expert, probe, ids, _ = setup
    other = encode_chat(lm.tokenizer, [{"role": "user", "content": "Tell me a long story about a dragon and a cat"}])
    settings = CorrectionSettings(gate=0.5, suspect_nll=1e6, suspect_window=4)
    c = Corrected(lm, probe, expert, settings, query_probe=_query_probe())
    cfg = GenerationConfig(max_new_tokens=4)
    alone = [c.generate(x, cfg).trace.gate["suspicion"] for x in (ids, other)]
    batch = c.decoder.generate_batch([ids, other], cfg)
    assert [g.trace.gate["suspicion"] for g in batch] == pytest.approx(alone, abs=2e-3)
    assert alone[0] != pytest.approx(alone[1], abs=1e-3)


def test_own_loops_keep_leaves_a_looping_answer_to_a_benign_read_request_as_undefended(setup):
    """End to end: the tiny model's greedy answer loops. Under a request the gate reads as
    benign and a monitor that never flags, ``own_loops: keep`` gives the undefended answer
    token for token; with ``close`` the defense takes the loop over."""
    lm, expert, probe, ids, _ = setup
    n = 60
    undefended = plain(lm, ids, n).token_ids
    guard = DegenerationGuard(4, 3)
    assert any(guard.loop_cut(undefended[:i]) is not None for i in range(1, n + 1))  # it does loop
    common = dict(tau=0.999999, k=8, window=8, gate=0.999999, loop_expert="gated")
    query = _query_probe()
    cfg = GenerationConfig(max_new_tokens=n)
    kept = Corrected(lm, probe, expert, CorrectionSettings(**common, own_loops="keep"), query_probe=query)
    gen = kept.generate(ids, cfg, query_len=ids.shape[1])
    assert gen.trace.events == [] and gen.token_ids == undefended
    closed = Corrected(lm, probe, expert, CorrectionSettings(**common, own_loops="close"), query_probe=query)
    gen = closed.generate(ids, cfg, query_len=ids.shape[1])
    # the tiny model writes no complete sentence to end after, so the expert answers instead
    assert gen.trace.events[0]["reason"] == "loop" and gen.token_ids != undefended


def test_the_demo_says_when_an_answer_was_withheld():
    from types import SimpleNamespace

    from rootdefense.decoding.trace import Trace
    from rootdefense.demo import _what_changed

    events = [{"type": "rollback", "reason": "harm", "keep_tokens": 0},
              {"type": "withhold", "reason": "uncorrected", "keep_tokens": 0}]
    said = _what_changed(SimpleNamespace(trace=Trace(finish_reason="withheld", events=events)))
    assert said == "0 tokens replaced, rolled back 1x, withheld: the expert's correction never came (content_filter)"
    assert "withheld" not in _what_changed(SimpleNamespace(trace=Trace(events=events[:1])))
