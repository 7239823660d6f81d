"""Draft head (EAGLE-style): self-distillation on a tiny model, save/load with checks, and
speculative decoding with the head changes no token."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tokenizer, save_tiny_model

from rootdefense.cli import cli
from rootdefense.decoding import Decoder, GenerationConfig, ThresholdRule
from rootdefense.drafting.head import (
    HeadDrafter,
    HeadSpec,
    distillation_data,
    head_meta,
    load_head,
    load_rows,
    reference_data,
    save_head,
    save_rows,
    train_head,
)
from rootdefense.errors import InputError
from rootdefense.models import encode_chat
from rootdefense.models.loading import LoadedModel
from rootdefense.paths import head_dir
from rootdefense.probes.base import LinearProbe

PROMPTS = ["How do I bake bread?", "Sure, here is a tutorial: step one", "hi", "The quick brown fox",
           "I cannot help with that request.", "Mix flour, water, salt and yeast", "step two, step three",
           "Sorry, here is some safety information instead."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = make_tokenizer()
    lm = LoadedModel(make_tiny_model(tok), tok, "tiny-head-target", torch.float32, torch.device("cpu"))
    spec = HeadSpec(prompts=len(PROMPTS), answer_tokens=24, epochs=30, draft_vocab=200, window=32, gen_batch=4,
                    lr=3e-3)
    rows = distillation_data(lm, spec, PROMPTS, log=lambda m: None)
    head, metrics = train_head(lm, spec, rows, log=lambda m: None)
    folder = save_head(head, tmp_path_factory.mktemp("head"), head_meta(lm, spec, metrics, len(PROMPTS)))
    return lm, folder, metrics


def test_training_learns_and_reports(trained):
    lm, folder, metrics = trained
    assert metrics["loss"][-1] < metrics["loss"][0] and metrics["fit_answers"] == 7
    assert 0 <= metrics["val_top1"] <= 1 and metrics["seconds"] > 0
    meta = json.loads((folder / "head.json").read_text())
    assert meta["model_id"] == "tiny-head-target" and meta["vocab_size"] == lm.model.get_output_embeddings(
    ).weight.shape[0]


def test_reference_data_holds_the_targets_own_choices(trained, tmp_path):
    """Teacher-forced rows: features and greedy targets are the target's, whatever the
    reference text says; they round-trip through safetensors and train a head."""
    lm = trained[0]
    pairs = [("How do I bake bread?", "Mix flour, water, salt and yeast, then bake it."),
             ("hi", "Hello! How can I help you today?"), ("x", "ok")]  # too short an answer: skipped
    rows = reference_data(lm, HeadSpec(answer_tokens=10), pairs)
    assert len(rows) == 2
    for r in rows:
        n = r["ids"].shape[0]
        assert r["features"].shape == (n, lm.hidden_size) and n - r["prompt_len"] <= 10
        with torch.no_grad():
            logits = lm.model(input_ids=r["ids"][None]).logits[0]
        assert torch.equal(r["greedy"], logits.argmax(-1))
    path = save_rows(rows, tmp_path / "rows.safetensors", {"n": 2})
    again = load_rows(path, {"n": 2})
    assert all(torch.equal(a["greedy"], b["greedy"]) and torch.equal(a["features"], b["features"])
               for a, b in zip(rows, again, strict=True))
    assert load_rows(path, {"n": 3}) is None  # other metadata: not reused
    spec = HeadSpec(epochs=2, draft_vocab=50, window=16)
    _, metrics = train_head(lm, spec, rows, log=lambda m: None, val=rows[:1])
    assert metrics["fit_answers"] == 2 and metrics["val_answers"] == 1 and metrics["loss"][-1] < metrics["loss"][0]


def test_head_drafts_change_no_token(trained):
    """Lossless with the head as drafter, undefended and defended (greedy)."""
    lm, folder, _ = trained
    head, _ = load_head(folder, lm)
    g = torch.Generator().manual_seed(7)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5, meta={})
    cfg = GenerationConfig(max_new_tokens=30)
    accepted = 0
    for prompt in PROMPTS[:4]:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}])
        for rule in (None, ThresholdRule(0.55)):
            drafter = HeadDrafter(lm.model, head)
            try:
                spec = Decoder(lm.model, lm.tokenizer, drafter=drafter, probe=probe, rule=rule,
                                          eos_token_ids=[lm.tokenizer.eos_token_id]).generate(ids, cfg)
            finally:
                drafter.close()
            ref = Decoder(lm.model, lm.tokenizer, probe=probe, rule=rule,
                          eos_token_ids=[lm.tokenizer.eos_token_id]).generate(ids, cfg)
            assert spec.token_ids == ref.token_ids
            accepted += spec.timings["accepted"]
    assert accepted > 0  # the head learnt the tiny model's (repetitive) answers


def _uncached_chain(drafter, context, k):
    """The chain the head drafts when it recomputes every position from the start (its
    training forward), for comparison with the cached drafter."""
    head, n = drafter.head, len(context) - 1
    feats = head.lift(torch.stack([drafter.features[(p, context[p])] for p in range(n)])[None])
    nxt = torch.tensor(context[1:n + 1])
    out = []
    for _ in range(k):
        pos = torch.arange(feats.shape[1])[None]
        pred = head(feats, drafter.embed(nxt)[None], pos, drafter.rotary)[0, -1]
        tok = int(head.vocab_ids[torch.argmax(pred @ drafter.lm_rows.T)])
        out.append(tok)
        feats = torch.cat([feats, pred[None, None]], dim=1)
        nxt = torch.cat([nxt, torch.tensor([tok])])
    return out


@torch.no_grad()
def test_cached_head_drafts_what_a_full_recompute_drafts(trained):
    """Round after round (drafts rejected, context grown), the head's own cache gives the
    chain a recompute over the whole context gives."""
    lm, folder, _ = trained
    head, _ = load_head(folder, lm)
    drafter = HeadDrafter(lm.model, head, window=1000, max_k=4)
    try:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
        gen = Decoder(lm.model, lm.tokenizer, drafter=drafter, max_draft=3).generate(
            ids, GenerationConfig(max_new_tokens=20))
        assert gen.timings["rounds"] > 3
        context = ids[0].tolist() + gen.token_ids[:-1]  # every token but the last was forwarded
        while (len(context) - 2, context[-2]) not in drafter.features:
            context.pop()
        got = drafter.propose(context, 4)
        assert got == _uncached_chain(drafter, context, len(got)) and len(got) >= 1
        assert drafter.propose(context, 4) == got  # asked again, nothing new: the same chain
        shorter = context[:-3]  # a rollback: the cache drops what no longer matches
        assert drafter.propose(shorter, 3) == _uncached_chain(drafter, shorter, 3)
    finally:
        drafter.close()


def test_head_for_another_target_or_mismatched_files_is_refused(trained, tmp_path):
    lm, folder, _ = trained
    other = LoadedModel(lm.model, lm.tokenizer, "another-model", torch.float32, torch.device("cpu"))
    with pytest.raises(InputError, match="trained for model 'tiny-head-target'"):
        load_head(folder, other)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((folder / "head.json").read_text())
    meta["shapes"]["fc.weight"] = [1, 2]
    (bad / "head.json").write_text(json.dumps(meta))
    (bad / "head.safetensors").write_bytes((folder / "head.safetensors").read_bytes())
    with pytest.raises(InputError, match="do not match its metadata"):
        load_head(bad, lm)
    (bad / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot be read"):
        load_head(bad, lm)
    with pytest.raises(InputError, match="no draft head at"):
        load_head(tmp_path / "nowhere", lm)


def test_cli_draft_train_and_generate_with_head(tmp_path, rd_home):
    d = save_tiny_model(tmp_path / "tiny")
    small = ["--model", str(d), "--prompts", "4", "--val-prompts", "3", "--draft-vocab", "100"]
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--answer-tokens", "8", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "draft head saved" in r.output and "answer tokens" in r.output
    meta = json.loads((head_dir(str(d)) / "head.json").read_text())
    assert "teacher-forced" in meta["data"]["source"] and meta["train"]["val_answers"] == 3
    # the features were saved: training again (other epochs, lr) reuses them
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--answer-tokens", "8", "--epochs", "2", "--lr", "0.003"])
    assert r.exit_code == 0, r.output
    assert "reusing the saved distillation data" in r.output and "data reused s" in r.output
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--answer-tokens", "6", "--epochs", "1"])
    assert r.exit_code == 0 and "reusing" not in r.output  # another answer length: made afresh
    # the model's own answers as data (slow on a real model)
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--data", "self", "--answer-tokens", "6", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "own greedy answers" in json.loads((head_dir(str(d)) / "head.json").read_text())["data"]["source"]
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--val-prompts", "0"])
    assert r.exit_code != 0 and "--val-prompts must be positive" in r.output
    # start from the saved head (more data, another vocabulary), with a decaying learning rate
    start = tmp_path / "start"
    shutil.copytree(head_dir(str(d)), start)
    r = CliRunner().invoke(cli, ["draft", "train", *small, "--answer-tokens", "8", "--epochs", "1", "--init",
                                 str(start), "--schedule", "cosine", "--draft-vocab", "80", "--unroll", "2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((head_dir(str(d)) / "head.json").read_text())
    assert meta["spec"]["schedule"] == "cosine" and meta["spec"]["unroll"] == 2 and meta["shapes"]["vocab_ids"] == [80]
    assert meta["train"]["init"]["data"]["source"] == json.loads((start / "head.json").read_text())["data"]["source"]
    other = save_tiny_model(tmp_path / "other")  # a head for another model is refused before any data is made
    r = CliRunner().invoke(cli, ["draft", "train", "--model", str(other), "--prompts", "4", "--init", str(start)])
    assert r.exit_code == 2 and "was trained for model" in r.output and "target answers" not in r.output
    r = CliRunner().invoke(cli, ["generate", "hi", "--model", str(d), "--defense", "none", "--drafter", "head",
                                 "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["settings"]["drafter"] == "draft-head"
    # auto takes the head only when its held-out acceptance pays for its drafting pass
    from rootdefense.drafting.factory import HEAD_MIN_ACCEPTED, head_pays

    folder = head_dir(str(d))
    meta = json.loads((folder / "head.json").read_text())
    for accepted, want in ((HEAD_MIN_ACCEPTED + 0.3, "prompt-lookup+draft-head"),
                           (HEAD_MIN_ACCEPTED - 0.3, "prompt-lookup")):
        meta["train"]["val_mean_accepted_of_4"] = accepted
        (folder / "head.json").write_text(json.dumps(meta))
        assert head_pays(folder) == (want != "prompt-lookup")
        r = CliRunner().invoke(cli, ["generate", "hi", "--model", str(d), "--defense", "none", "--drafter", "auto",
                                     "--max-new-tokens", "6", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["settings"]["drafter"] == want
    r = CliRunner().invoke(cli, ["generate", "hi", "--model", str(d), "--defense", "none", "--drafter",
                                 f"head:{tmp_path / 'missing'}"])
    assert r.exit_code == 2 and "no draft head at" in r.output
    bare = save_tiny_model(tmp_path / "bare")  # no head trained for this model: ngram+head says so
    r = CliRunner().invoke(cli, ["generate", "hi", "--model", str(bare), "--defense", "none", "--drafter", "ngram+head"])
    assert r.exit_code == 2 and "no draft head at" in r.output and "draft train" in r.output


def test_more_prompts_extend_the_saved_data(tmp_path, rd_home):
    """draft train with more prompts than a saved set makes only the new prompts' rows, and
    the result is the set made from nothing."""
    from rootdefense.drafting.head import load_rows

    d = save_tiny_model(tmp_path / "tiny")
    common = ["draft", "train", "--model", str(d), "--val-prompts", "2", "--draft-vocab", "100", "--answer-tokens", "8",
              "--epochs", "1"]
    assert CliRunner().invoke(cli, [*common, "--prompts", "4"]).exit_code == 0
    r = CliRunner().invoke(cli, [*common, "--prompts", "7"])
    assert r.exit_code == 0, r.output
    assert "extending the saved distillation data for 4 prompts" in r.output and "with 3 more" in r.output
    folder = head_dir(str(d))
    meta = {"model_id": str(d), "prompts": 7, "answer_tokens": 8,
            "source": "sharegpt fit split, reference answers, teacher-forced"}
    extended = load_rows(folder / "distill-ref-7x8.safetensors", meta)
    r = CliRunner().invoke(cli, [*common, "--prompts", "7", "--fresh-data"])
    assert r.exit_code == 0 and "extending" not in r.output
    fresh = load_rows(folder / "distill-ref-7x8.safetensors", meta)
    assert extended is not None and len(extended) == len(fresh) > 4
    for a, b in zip(extended, fresh, strict=True):
        assert a["prompt_len"] == b["prompt_len"] and torch.equal(a["ids"], b["ids"])
        assert torch.equal(a["greedy"], b["greedy"]) and torch.allclose(a["features"], b["features"])


def test_unrolled_training_reads_its_own_predictions(trained):
    """unroll=2: the second pass over a window reads the first pass's predicted features,
    shifted one position (the first position keeps the target's), and both passes count."""
    from rootdefense.drafting.head import DraftHead
    from rootdefense.drafting.head.network import target_decoder
    from rootdefense.drafting.head.training import _batch_loss, pick_vocab

    lm = trained[0]
    rows = reference_data(lm, HeadSpec(answer_tokens=10), [("How do I bake bread?", "Mix flour, water, salt and yeast.")])
    head = DraftHead(lm.model, pick_vocab(rows, 50, lm.model.get_output_embeddings().weight.shape[0]))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    remap = torch.full((vocab,), -100, dtype=torch.long)
    remap[head.vocab_ids] = torch.arange(head.vocab_ids.numel())
    weight = lm.model.get_output_embeddings().weight.detach()[head.vocab_ids]
    calls = []
    forward = head.forward

    def spy(features, *args, **kwargs):
        out = forward(features, *args, **kwargs)
        calls.append((features.detach().clone(), out.detach().clone()))
        return out

    head.forward = spy
    items = [(rows[0], 0, rows[0]["ids"].shape[0])]
    args = (lm.model.get_input_embeddings(), target_decoder(lm.model).rotary_emb, weight, remap)
    one = _batch_loss(head, items, *args, HeadSpec(unroll=1), lm.device)
    two = _batch_loss(head, items, *args, HeadSpec(unroll=2), lm.device)
    assert len(calls) == 3  # one pass, then two
    (f1, p1), (f2, _) = calls[1], calls[2]
    assert torch.equal(f1, calls[0][0]) and torch.equal(f2[:, 0], f1[:, 0]) and torch.equal(f2[:, 1:], p1[:, :-1])
    assert float(two) != float(one) and float(two) > 0
    with pytest.raises(InputError, match="unroll"):
        HeadSpec(unroll=0)


@torch.no_grad()
def _fresh_features(lm, ids: list[int], taps) -> torch.Tensor:
    hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[t][0] for t in taps] + [hs[-1][0]], dim=-1)


def test_tapped_head_reads_extra_layers(trained, tmp_path):
    """EAGLE-3-style taps: the rows hold the tapped hidden states beside the final feature;
    a tapped head started from an untapped one predicts what that one predicts; while
    decoding, the drafter records exactly the raw features a fresh forward gives; drafting
    stays lossless and its cache agrees with a full recompute; the taps travel with the head."""
    from rootdefense.drafting.head import DraftHead
    from rootdefense.drafting.head.network import target_decoder

    lm, folder, _ = trained
    h, taps = lm.hidden_size, (1, 2)
    pairs = [("How do I bake bread?", "Mix flour, water, salt and yeast, then bake it."),
             ("hi", "Hello! How can I help you today?")]
    rows = reference_data(lm, HeadSpec(answer_tokens=12, taps=taps), pairs)
    for r in rows:
        assert r["features"].shape == (r["ids"].shape[0], 3 * h)
        assert torch.allclose(r["features"], _fresh_features(lm, r["ids"].tolist(), taps), atol=1e-5)
    plain, _ = load_head(folder, lm)
    start = DraftHead(lm.model, plain.vocab_ids, taps=taps)
    start.load_state_dict(plain.state_dict(), strict=False)
    r, rot, embed = rows[0], target_decoder(lm.model).rotary_emb, lm.model.get_input_embeddings()
    n = r["ids"].shape[0] - 1
    emb, pos = embed(r["ids"][1:])[None], torch.arange(n)[None]
    with torch.no_grad():
        assert torch.allclose(start(start.lift(r["features"][None, :n]), emb, pos, rot),
                              plain(r["features"][None, :n, -h:], emb, pos, rot), atol=1e-5)
    head, metrics = train_head(lm, HeadSpec(epochs=3, draft_vocab=120, window=16, taps=taps), rows,
                               log=lambda m: None, val=rows[:1], init=plain)
    assert metrics["loss"][-1] < metrics["loss"][0]
    spec = HeadSpec(prompts=2, draft_vocab=120, taps=taps)
    saved = save_head(head, tmp_path / "tapped", head_meta(lm, spec, metrics, 2, "reference"))
    loaded, meta = load_head(saved, lm)
    assert loaded.taps == taps and meta["spec"]["taps"] == [1, 2] and meta["shapes"]["fuse.weight"] == [h, 3 * h]
    g = torch.Generator().manual_seed(7)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5, meta={})
    cfg = GenerationConfig(max_new_tokens=24)
    for prompt in PROMPTS[:3]:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}])
        drafter = HeadDrafter(lm.model, loaded, window=1000, max_k=3)
        try:
            got = Decoder(lm.model, lm.tokenizer, drafter=drafter, probe=probe, rule=ThresholdRule(0.55),
                                     eos_token_ids=[lm.tokenizer.eos_token_id]).generate(ids, cfg)
            want = Decoder(lm.model, lm.tokenizer, probe=probe, rule=ThresholdRule(0.55),
                           eos_token_ids=[lm.tokenizer.eos_token_id]).generate(ids, cfg)
            assert got.token_ids == want.token_ids
            context = ids[0].tolist() + got.token_ids[:-1]
            fresh = _fresh_features(lm, context, taps)
            recorded = [p for p in range(len(context)) if (p, context[p]) in drafter.features]
            assert len(recorded) >= len(context) - 2
            for p in recorded:
                assert torch.allclose(drafter.features[(p, context[p])], fresh[p], atol=1e-4)
            while (len(context) - 2, context[-2]) not in drafter.features:
                context.pop()
            chain = drafter.propose(context, 3)
            assert chain == _uncached_chain(drafter, context, len(chain)) and chain
        finally:
            drafter.close()


def test_bad_taps_are_refused(trained, tmp_path, rd_home):
    from rootdefense.drafting.head import DraftHead

    lm, folder, _ = trained
    plain, _ = load_head(folder, lm)
    for bad in ((0,), (2, 1), (1, 1)):
        with pytest.raises(InputError, match="taps"):
            HeadSpec(taps=bad)
    with pytest.raises(InputError, match=r"taps must lie in 1\.\.2"):
        DraftHead(lm.model, plain.vocab_ids, taps=(3,))  # the tiny model has 3 layers
    d = save_tiny_model(tmp_path / "tiny")
    for taps, message in (("3", "must lie in 1..2"), ("1,x", "comma-separated integers")):
        r = CliRunner().invoke(cli, ["draft", "train", "--model", d, "--prompts", "3", "--taps", taps])
        assert r.exit_code == 2 and message in r.output and "target features" not in r.output
    r = CliRunner().invoke(cli, ["draft", "train", "--model", d, "--prompts", "3", "--val-prompts", "2",
                                 "--answer-tokens", "8", "--epochs", "1", "--draft-vocab", "60", "--taps", "2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((head_dir(d) / "head.json").read_text())
    assert meta["spec"]["taps"] == [2] and "hidden states [2]" in meta["data"]["source"]
    assert (head_dir(d) / "distill-ref-taps2-3x8.safetensors").exists()
    assert (head_dir(d) / "distill-val-taps2-2x8.safetensors").exists()


def test_taps_a_model_cannot_hook_are_refused(trained, monkeypatch):
    """Where a tapped layer's output cannot be caught by a hook (the checked mapping of
    decoding.hidden fails), drafting with a tapped head stops with a clear error."""
    from rootdefense.drafting.head import DraftHead
    from rootdefense.drafting.head import drafter as head_drafter
    from rootdefense.errors import ModelError

    lm, folder, _ = trained
    plain, _ = load_head(folder, lm)
    tapped = DraftHead(lm.model, plain.vocab_ids, taps=(1,))
    monkeypatch.setattr(head_drafter, "layer_module", lambda model, layer: None)
    with pytest.raises(ModelError, match=r"hidden states \[1\] cannot all be caught by hooks"):
        HeadDrafter(lm.model, tapped)
    drafter = HeadDrafter(lm.model, plain)  # no taps: nothing to catch
    drafter.close()
    assert drafter.head is plain
