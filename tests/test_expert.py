"""The safety-expert adapter on the tiny model: training runs and learns, the saved adapter
reloads with checks, and base and expert share one mixed-adapter forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer

from rootdefense.errors import ExpertError, InputError
from rootdefense.expert import ExpertSpec, load_expert, train_expert
from rootdefense.models.loading import LoadedModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = make_tokenizer()
    lm = LoadedModel(make_tiny_model(tok, seed=4), tok, "tiny-expert", torch.float32, torch.device("cpu"))
    out = tmp_path_factory.mktemp("expert")
    spec = ExpertSpec(harmful=16, benign=16, answer_tokens=12, epochs=3, batch_size=8, lr=3e-3, rank=4,
                      disguised=3, families=("roleplay", "prefix-injection"), alarming=4)
    meta = train_expert(lm, spec, out, log=lambda *_: None)
    return lm, out, meta


def test_training_learns_and_records_metadata(trained):
    lm, out, meta = trained
    assert meta["model_id"] == "tiny-expert" and meta["hidden_size"] == 48
    assert meta["train"]["final_loss"] < meta["train"]["first_loss"]
    counts = meta["data"]["counts"]
    assert {k.split(":")[0] for k in counts} == {"refuse", "answer"}
    # each wrapper family: 3 harmful requests refused, 3 benign ones answered inside it
    for family in ("roleplay", "prefix-injection"):
        assert sum(n for k, n in counts.items() if k.startswith(f"refuse:{family}:")) == 3
    assert not any(k.startswith(("refuse:fiction", "refuse:dan", "refuse:autodan")) for k in counts)
    assert any(k.startswith("answer:") and k.endswith(":alarming") for k in counts)
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "expert.json").read_text())["model_id"] == "tiny-expert"
    # training handed the plain model back
    assert not any("lora" in n for n, _ in lm.model.named_modules())


def test_examples_wrap_requests_and_keep_the_test_split_out(trained):
    from rootdefense.data.split import alarming_part, split_of
    from rootdefense.expert import build_examples

    lm, _, _ = trained
    spec = ExpertSpec(harmful=8, benign=8, answer_tokens=4, disguised=2, families=("fiction",), alarming=4)
    rows = build_examples(lm, spec, log=lambda *_: None)
    wrapped = [r for r in rows if r["source"].startswith("fiction:")]
    assert len([r for r in wrapped if r["kind"] == "refuse"]) == 2
    plain = {r["prompt"] for r in rows if r["kind"] == "refuse" and ":" not in r["source"]}
    # a wrapped harmful request is one of the plain ones, inside the frame
    assert all(any(p in r["prompt"] for p in plain) for r in wrapped if r["kind"] == "refuse")
    assert all(split_of(r["prompt"]) != "test" for r in rows if ":" not in r["source"] and r["source"] != "alarming")
    assert all(alarming_part(r["prompt"]) == "fit" for r in rows if r["source"] == "alarming")


def test_length_batches_group_similar_lengths_and_cover_everything():
    from rootdefense.expert.train import length_batches

    lengths = [900, 20, 25, 880, 30, 910, 22, 870]
    batches = length_batches(lengths, 4, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[20, 22, 25, 30], [870, 880, 900, 910]]
    assert length_batches(lengths, 4, seed=1) == batches


def test_mixed_adapter_batch_matches_separate_passes(trained):
    lm, out, _ = trained
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        model, info = load_expert(lm, out)
        try:
            expert = model(input_ids=ids).logits
            mixed = model(input_ids=ids.repeat(2, 1), adapter_names=["__base__", "expert"]).logits
        finally:
            model.unload()
    assert info.meta["model_id"] == "tiny-expert"
    assert not torch.allclose(plain, expert, atol=1e-3), "the adapter changes the model"
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], expert[0], atol=1e-5, rtol=1e-5)


def test_expert_for_another_model_or_missing_is_refused(trained, tmp_path):
    lm, out, _ = trained
    other = LoadedModel(lm.model, lm.tokenizer, "someone/else", torch.float32, torch.device("cpu"))
    with pytest.raises(ExpertError, match="trained for model 'tiny-expert'"):
        load_expert(other, out)
    with pytest.raises(ExpertError, match="no expert adapter"):
        load_expert(lm, tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "expert.json").write_text("{oops")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ExpertError, match="corrupt"):
        load_expert(lm, tmp_path / "bad")


@pytest.mark.parametrize("kwargs", [{"harmful": 2}, {"rank": 0}, {"epochs": 0}, {"lr": 2.0}, {"disguised": -1},
                                    {"families": ("roleplay", "nope")}])
def test_spec_validation(kwargs):
    with pytest.raises(InputError):
        ExpertSpec(**kwargs)
