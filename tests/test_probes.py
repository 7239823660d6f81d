"""Probe fitting, persistence and the training pipeline (on the tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from rootdefense.errors import InputError, ProbeError
from rootdefense.models.loading import LoadedModel
from rootdefense.probes.base import LinearProbe
from rootdefense.probes.fit import fit_affine
from rootdefense.probes.train import TrainSpec, train_probe
from rootdefense.stats import threshold_at_fpr


def _data(seed=0, n=300, d=20):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + rng.normal(size=d)
    y = (X[:, 0] / 3 + X[:, 1] + rng.normal(size=n) > 0.5).astype(int)
    return X, y


@pytest.mark.parametrize("standardize,pca", [(True, None), (False, 4), (True, 4)])
def test_affine_collapse_equals_pipeline(standardize, pca):
    X, y = _data()
    w, b = fit_affine(X, y, standardize=standardize, pca_dims=pca, C=0.5)
    Z = StandardScaler().fit_transform(X) if standardize else X
    if pca:
        Z = PCA(n_components=pca, random_state=0).fit_transform(Z)
    ref = LogisticRegression(C=0.5, max_iter=3000, class_weight="balanced").fit(Z, y).decision_function(Z)
    np.testing.assert_allclose(X @ w + b, ref, rtol=1e-3, atol=1e-4)


def test_threshold_at_fpr_flags_at_most_that_share():
    s = np.linspace(0, 1, 101)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t = threshold_at_fpr(s, fpr)
        assert (s >= t).mean() <= fpr + 1e-12
        assert (s >= t).sum() == int(np.floor(fpr * len(s)))


def test_probe_roundtrip_and_checks(tmp_path):
    p = LinearProbe(torch.randn(16), 0.25, layer=3, threshold=0.4, meta={"model_id": "m", "kind": "query"})
    p.save(tmp_path / "p")
    q = LinearProbe.load(tmp_path / "p" / "probe.safetensors")
    torch.testing.assert_close(q.weight, p.weight)
    assert (q.bias, q.layer, q.threshold, q.model_id) == (0.25, 3, 0.4, "m")
    h = torch.randn(5, 16)
    torch.testing.assert_close(q.score(h), torch.sigmoid(h @ p.weight + 0.25))
    q.check_model("m", 16, 4)
    with pytest.raises(ProbeError, match="trained for model 'm'"):
        q.check_model("other", 16, 4)
    with pytest.raises(ProbeError, match="hidden size"):
        q.check_model("m", 32, 4)
    with pytest.raises(ProbeError, match="layer 3"):
        q.check_model("m", 16, 2)


def test_probe_load_rejects_mismatched_metadata(tmp_path):
    import json

    LinearProbe(torch.randn(16), 0.0, 1, 0.5, {"model_id": "m"}).save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    meta["hidden_size"] = 99
    (tmp_path / "p" / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="metadata says"):
        LinearProbe.load(tmp_path / "p")
    del meta["layer"]
    (tmp_path / "p" / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="lacks 'layer'"):
        LinearProbe.load(tmp_path / "p")


def test_train_spec_validation():
    with pytest.raises(InputError):
        TrainSpec(kind="magic")
    with pytest.raises(InputError):
        TrainSpec(target_fpr=0.9)
    assert TrainSpec(kind="response").target_fpr == 0.05


@pytest.fixture(scope="module")
def tiny_lm(tiny_model, tiny_tokenizer):
    return LoadedModel(tiny_model, tiny_tokenizer, "tiny", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["paper", "query", "response"])
def test_training_pipeline_runs_end_to_end(tiny_lm, kind, tmp_path):
    spec = TrainSpec(kind=kind, per_dataset=12, layers=[1, 3] if kind != "paper" else None,
                     self_answers=8, answer_tokens=6)
    probe, metrics = train_probe(tiny_lm, spec, log=lambda *_: None)
    assert probe.hidden_size == 48 and probe.model_id == "tiny" and probe.meta["kind"] == kind
    assert probe.layer == (3 if kind == "paper" else probe.layer) and probe.layer in (1, 3)
    assert 0 < probe.threshold < 1 + 1e-9
    assert set(metrics) >= {"test_auroc", "edgy_fpr", "cross_tpr", "layer"}
    assert probe.meta["data"]["counts"]
    # the project's sensitive questions are benign training data (their own answers, for
    # the response probe), and their held-out flag rate is reported on its own
    assert ("self-sensitive" if kind == "response" else "sensitive") in probe.meta["data"]["counts"]
    assert metrics["test_fpr_by_source"] and all(0 <= v <= 1 for v in metrics["test_fpr_by_source"].values())
    probe.save(tmp_path / kind)
    assert LinearProbe.load(tmp_path / kind).layer == probe.layer
