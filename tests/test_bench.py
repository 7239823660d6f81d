"""`rootdefense bench` on a tiny model saved to a folder: every method answers every prompt,
ratios are against transformers generate in the same run, lossless methods reproduce its
tokens, bad requests are refused before any model loads."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import (
    save_response_probe,
    save_tiny_model,
)

from rootdefense.bench import METHODS, BenchSpec
from rootdefense.cli import cli
from rootdefense.errors import InputError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bench-model"), max_positions=4096)


def test_bench_json_covers_every_method_and_set(tiny_dir, rd_home, tmp_path):
    save_response_probe(tiny_dir)
    r = CliRunner().invoke(cli, ["draft", "train", "--model", tiny_dir, "--prompts", "4", "--answer-tokens", "8",
                                 "--epochs", "1", "--draft-vocab", "100"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench", "--model", tiny_dir, "--prompts", "2", "--max-new-tokens", "12",
                                 "--draft-model", tiny_dir, "--threads", "1", "--json", "--out", str(out),
                                 "--methods", ",".join(METHODS), "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    got = {(x["method"], x["set"]): x for x in report["results"]}
    assert len(got) == len(METHODS) * 2 and not report["skipped"]
    for x in report["results"]:
        assert x["prompts"] == (3 if x["method"].endswith("-batch") else 2) and x["tokens_per_s"] > 0 and x["ms_per_token"] > 0 and x["peak_rss_mb"] > 0
        assert {"method", "set", "tokens_per_s", "ms_per_token", "ratio_vs_generate", "accepted_len",
                "peak_rss_mb"} <= set(x)
    for s in ("benign", "harmful"):
        assert got[("hf-generate", s)]["ratio_vs_generate"] == 1.0
        assert got[("hf-generate", s)]["paired_ratio_vs_generate"] == 1.0
        assert got[("plain", s)]["ratio_vs_plain"] == 1.0 and got[("rds-lazy", s)]["ratio_vs_plain"] > 0
        assert got[("rds-batch", s)].get("paired_ratio_vs_generate") is None  # a batch has no per-prompt timing
        # the per-prompt rows are kept, and the paired ratio is their median
        plain = [x for x in report["per_prompt"] if x["method"] == "plain" and x["set"] == s]
        gen = {x["prompt"]: x["tokens"] / x["wall_s"] for x in report["per_prompt"]
               if x["method"] == "hf-generate" and x["set"] == s}
        assert sorted(x["prompt"] for x in plain) == [0, 1]
        want = sorted(x["tokens"] / x["wall_s"] / gen[x["prompt"]] for x in plain)
        assert got[("plain", s)]["paired_ratio_vs_generate"] == pytest.approx((want[0] + want[1]) / 2, rel=2e-3, abs=2e-3)
        # undefended greedy decoders reproduce generate's tokens exactly
        for lossless in ("hf-prompt-lookup", "hf-assisted", "plain"):
            assert got[(lossless, s)]["same_as_generate"] == 1.0, lossless
        assert got[("rds-spec-ngram", s)]["accepted_len"] is not None
        assert got[("rds-spec-head", s)]["accepted_len"] is not None
        assert got[("rds-expert-exact", s)]["accepted_len"] is None
        assert got[("rds-batch", s)]["ratio_vs_single"] > 0 and got[("rds-batch", s)]["batch_size"] == 3
        for batched in ("rds-spec-threshold-ngram-batch", "rds-spec-ngram-batch"):
            assert got[(batched, s)]["accepted_len"] is not None and got[(batched, s)]["ratio_vs_rds_exact"] > 0
    assert report["machine"]["cpu"] and report["machine"]["linear_calibration_s"] >= 0
    prof = report["profile"]
    assert prof["linear_policy"] == "auto" and set(prof["chain_forward_ms_stock_linear"]) == set(prof["chain_forward_ms"])
    assert set(prof["chain_forward_ms"]) == {"1", "2", "3", "4", "5", "6", "8", "12"}
    assert all(v > 0 for v in prof["chain_forward_ms"].values()) and prof["chain_cost_vs_one_token"]["1"] == 1.0
    assert prof["candidate_forward_ms"]["ms"] > 0 and prof["probe_ms"] > 0
    assert prof["candidate_forward_ms"]["candidates"] == 20  # the decoders' default pool
    rows = prof["batch_forward_ms"]
    assert rows["rows"] == 3 and rows["one_token"] > 0 and rows["pool"] > 0 and rows["candidates"] == 20


@pytest.mark.parametrize("kwargs, needle", [
    ({"methods": ("plain",)}, "needs 'hf-generate'"),
    ({"methods": ("hf-generate", "warp")}, "unknown bench method"),
    ({"methods": ("hf-generate", "rds-spec-model")}, "need --draft-model"),
    ({"prompts": 0}, "prompts and batch_size must be"),
    ({"batch_size": 0}, "prompts and batch_size must be"),
])
def test_bench_spec_is_checked(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        BenchSpec(**kwargs)


def test_bench_prints_a_table(tiny_dir, rd_home):
    r = CliRunner().invoke(cli, ["bench", "--model", tiny_dir, "--prompts", "1", "--max-new-tokens", "4",
                                 "--methods", "hf-generate,plain"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("hf-generate", "plain"))]
    assert len(lines) == 4 and "x generate" in r.output


def test_bench_skips_a_method_whose_part_is_missing(tiny_dir, rd_home):
    r = CliRunner().invoke(cli, ["bench", "--model", tiny_dir, "--prompts", "1", "--max-new-tokens", "4",
                                 "--methods", "hf-generate,plain-spec-head", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert "no draft head at" in report["skipped"]["plain-spec-head"]
    assert [x["method"] for x in report["results"]] == ["hf-generate", "hf-generate"]
