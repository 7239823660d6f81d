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
    spec = ExpertSpec(harmful=16, benign=16, answer_tokens=12, epochs=3, batch_size=8, lr=3e-3, rank=4)
    meta = train_expert(lm, spec, out, log=lambda *_: None)
    return lm, out, meta


def test_training_learns_and_records_metadata(trained):
    lm, out, meta = trained
    assert meta["model_id"] == "tiny-expert" and meta["hidden_size"] == 48
    assert meta["train"]["final_loss"] < meta["train"]["first_loss"]
    kinds = {k.split(":")[0] for k in meta["data"]["counts"]}
    assert kinds == {"refuse", "answer"}
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "expert.json").read_text())["model_id"] == "tiny-expert"
    # training handed the plain model back
    assert not any("lora" in n for n, _ in lm.model.named_modules())


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


@pytest.mark.parametrize("kwargs", [{"harmful": 2}, {"rank": 0}, {"epochs": 0}, {"lr": 2.0}])
def test_spec_validation(kwargs):
    with pytest.raises(InputError):
        ExpertSpec(**kwargs)
