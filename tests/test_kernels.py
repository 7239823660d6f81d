"""The size-picked linear products (models/kernels.py): the same outputs as F.linear up to
float rounding, the same greedy answers, installed by the loader on CPU, removable, and a
clear error for an unknown policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, save_tiny_model
from torch import nn

from rootdefense import paths
from rootdefense.errors import InputError
from rootdefense.models import kernels


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-kernels-model"))


@pytest.fixture()
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=3).eval()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, kernels.MAX_ROWS, kernels.MAX_ROWS + 1])
def test_the_transposed_product_is_f_linear_up_to_rounding(rows):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(64, 96, bias=True)
    x = torch.randn(2, rows, 64, generator=g) if rows % 2 == 0 else torch.randn(rows, 64, generator=g)
    want = F.linear(x, lin.weight, lin.bias)
    assert kernels.install(lin, "transposed") == 1 and kernels.installed(lin)
    got = lin(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if rows > kernels.MAX_ROWS:
        assert torch.equal(got, want)  # prefill: F.linear itself


def test_installed_model_decodes_the_same_greedy_tokens(model, tiny_tokenizer):
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             pad_token_id=0)
        ref_logits = model(input_ids=ids).logits
        n = kernels.install(model, "transposed")
        assert n == sum(type(m) is nn.Linear for m in model.modules()) and n > 0
        calls = []
        real = kernels._transposed
        kernels._transposed = lambda w, x: calls.append(x.shape[0]) or real(w, x)
        try:
            got_logits = model(input_ids=ids).logits
        finally:
            kernels._transposed = real
        got = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             pad_token_id=0)
    # the other product really ran (on some processors it rounds exactly as F.linear does) ...
    assert len(calls) == n
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-4)  # ... to the same values
    assert got.tolist() == ref.tolist()


def test_stock_linears_runs_f_linear_inside_and_restores(model, monkeypatch):
    kernels.install(model, "transposed")
    calls = []
    real = kernels._transposed
    monkeypatch.setattr(kernels, "_transposed", lambda w, x: calls.append(x.shape[0]) or real(w, x))
    ids = torch.tensor([[5, 9, 14]])
    with torch.no_grad():
        with kernels.stock_linears(model):
            assert not kernels.installed(model)
            model(input_ids=ids)
        assert calls == []
        model(input_ids=ids)
    assert kernels.installed(model) and calls and set(calls) == {3}
    kernels.uninstall(model)
    assert not kernels.installed(model)


def test_auto_times_each_size_once_over_every_layer_of_the_shape(monkeypatch, rd_home):
    model = nn.Sequential(nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 32), nn.Linear(32, 40))
    kernels.install(model, "auto")
    timed = []
    real = kernels._best_s

    def spy(fn, reps=3):
        timed.append(len(fn()))  # how many layers one timing reads
        return real(fn, reps)

    monkeypatch.setattr(kernels, "_best_s", spy)
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_LOADED", set())
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 32))
        model(torch.randn(kernels.MAX_ROWS + 1, 32))
    # rows 4: each shape's two products timed once (both 32->40 layers together), then remembered
    assert sorted(timed) == [1, 1, 2, 2]
    assert sorted(k[:2] for k in kernels._CHOICES) == [(32, 40), (40, 32)]
    assert all(k[3] == 4 for k in kernels._CHOICES)


def test_policy_from_the_environment(monkeypatch, model):
    monkeypatch.setenv(kernels.ENV, "stock")
    assert kernels.install(model) == 0 and not kernels.installed(model)
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(InputError, match="ROOTDEFENSE_LINEAR='fast'.*auto, stock, transposed"):
        kernels.install(model)
    with pytest.raises(InputError, match="unknown linear-layer policy"):
        kernels.install(model, "nope")


def test_the_loader_installs_them_on_cpu(tiny_dir, monkeypatch):
    from rootdefense.models import load_model

    assert kernels.installed(load_model(tiny_dir).model)
    monkeypatch.setenv(kernels.ENV, "stock")
    assert not kernels.installed(load_model(tiny_dir).model)


def test_a_peft_adapter_wraps_an_installed_layer(model):
    from peft import LoraConfig, get_peft_model

    kernels.install(model, "transposed")
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, base)  # LoRA B starts at zero


def test_choices_are_kept_in_the_home_and_calibrate_covers_every_bucket(monkeypatch, rd_home):
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    kernels.install(model, "auto")
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_LOADED", set())
    spent = kernels.calibrate(model)
    assert spent > 0 and len(kernels._CHOICES) == 2 * len(kernels.BUCKETS)
    first = dict(kernels._CHOICES)
    saved = rd_home / paths.KERNELS_FILE
    assert saved.exists()
    # a later process on the same machine reads them instead of timing again
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_LOADED", set())
    real = kernels._best_s
    monkeypatch.setattr(kernels, "_best_s", lambda fn, reps=3: pytest.fail("timed again"))
    kernels.calibrate(model)
    assert kernels._CHOICES == first
    with torch.no_grad():
        model(torch.randn(5, 16))  # 5 rows: bucket 6, known
    # an unreadable file is timed again and rewritten, not an error
    saved.write_text("{not json")
    monkeypatch.setattr(kernels, "_best_s", real)
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_LOADED", set())
    assert kernels.calibrate(model) > 0 and saved.read_text().startswith("{")
    assert paths.kernels_file() == saved
