"""Tuned defaults: the monitor sweep's arithmetic, the choice, presets and how settings are
resolved (tuned file, shipped file, fallback, explicit flags), and `rootdefense tune` on a
tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    save_response_probe,
    save_tiny_model,
)

from rootdefense import defaults, paths
from rootdefense.api import resolve_settings
from rootdefense.cli import cli
from rootdefense.correction import RecoveryMonitor
from rootdefense.data.split import alarming_part, edgy_half, split_of
from rootdefense.errors import InputError, ProbeError
from rootdefense.probes.base import LinearProbe
from rootdefense.tuning import (
    TuneSpec,
    calibration_prompts,
    blended,
    choose,
    flag_index,
    gated,
    pareto,
    sweep,
)


@pytest.mark.parametrize("harms", [[0.1, 0.9, 0.2, 0.95, 0.3, 0.99, 0.1], [0.9] * 5, [0.1] * 9,
                                   [0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9]])
@pytest.mark.parametrize("window, k", [(1, 1), (4, 2), (4, 3), (8, 3)])
def test_flag_index_replays_the_recovery_monitor(harms, window, k):
    """The sweep must flag exactly where the decoder's monitor would."""
    m = RecoveryMonitor(0.8, window, k)
    expected = next((i + 1 for i, h in enumerate(harms) if m.update(h)), None)
    assert flag_index(harms, 0.8, window, k) == expected


@pytest.mark.parametrize("blend, query", [(0.25, 0.9), (0.5, 0.95), (0.5, 0.05)])
def test_blended_traces_replay_the_trajectory_monitor(blend, query):
    """The sweep's view of a blended monitor flags where the decoder's would: each token's
    score is (1 - blend) x harm + blend x the request's query score."""
    harms = [0.1, 0.6, 0.2, 0.7, 0.65, 0.3, 0.9]
    m = RecoveryMonitor(0.7, 4, 2, query=query, blend=blend)
    expected = next((i + 1 for i, h in enumerate(harms) if m.update(h)), None)
    assert flag_index(blended([harms], [query], blend)[0], 0.7, 4, 2) == expected
    assert blended([harms], [query], 0.0)[0] is harms
    # a request that reads as harmful needs less harm from its answer, a benign one more
    plain = flag_index(harms, 0.7, 4, 2)
    if query > 0.7:
        assert expected is not None and (plain is None or expected <= plain)
    else:
        assert expected is None and plain is not None


def test_sweep_and_choice_respect_the_benign_budget():
    harmful = {"none": [[0.95, 0.95, 0.95], [0.7, 0.7, 0.7]], "prefill": [[0.99, 0.2, 0.2]]}
    benign = [[0.75, 0.75, 0.1], [0.1, 0.1, 0.1]]
    rows = sweep(harmful, benign, taus=(0.6, 0.9), windows=(4,))
    by = {(r["tau"], r["k"]): r for r in rows}
    assert by[(0.6, 1)]["harmful_flag_rate"] == 1.0 and by[(0.6, 1)]["benign_flag_rate"] == 0.5
    assert by[(0.9, 1)]["per_attack"] == {"none": 0.5, "prefill": 1.0}
    assert by[(0.9, 1)]["benign_flag_rate"] == 0.0 and by[(0.9, 1)]["median_flag_token"] == 1
    best = choose(rows, max_benign_flag=0.0)
    assert (best["tau"], best["k"]) == (0.9, 1)  # the most harmful flags with no benign flag
    assert choose(rows, max_benign_flag=0.5)["harmful_flag_rate"] == 1.0
    front = pareto(rows)
    assert [(r["benign_flag_rate"], r["harmful_flag_rate"]) for r in front] == [(0.0, 0.6667), (0.5, 1.0)]
    with pytest.raises(InputError, match="no monitor setting keeps benign flags"):
        choose(sweep(harmful, [[0.999] * 3], taus=(0.6,), windows=(1,)), max_benign_flag=0.0)


def test_the_gate_flags_what_no_single_setting_can():
    """A harmful answer that reads mildly harmful (0.7) looks like the benign one (0.75):
    no single setting flags it without flagging that benign answer. Its request scores
    high on the query probe and the benign one low, so a gate separates them."""
    harmful = {"none": [[0.95, 0.95, 0.95], [0.7, 0.7, 0.7]], "prefill": [[0.99, 0.2, 0.2]]}
    benign = [[0.75, 0.75, 0.75], [0.1, 0.1, 0.1]]
    hq = {"none": [0.9, 0.95], "prefill": [0.2]}
    bq = [0.3, 0.1]
    best = choose(sweep(harmful, benign, taus=(0.6, 0.9), windows=(4,)), max_benign_flag=0.0)
    assert best["harmful_flag_rate"] == 0.6667
    g = gated(harmful, benign, hq, bq, taus=(0.6, 0.9), windows=(4,), gates=(0.5,), max_benign_flag=0.0)
    assert g["harmful_flag_rate"] == 1.0 and g["benign_flag_rate"] == 0.0 and g["gate"] == 0.5
    assert g["strict_tau"] == 0.6 and g["tau"] == 0.9 and g["per_attack"] == {"none": 1.0, "prefill": 1.0}
    assert g["harmful_gated"] == 0.6667 and g["benign_gated"] == 0.0
    # a gate the benign look-alike passes too gains nothing within the budget
    g = gated(harmful, benign, hq, [0.99, 0.1], taus=(0.6, 0.9), windows=(4,), gates=(0.5,), max_benign_flag=0.0)
    assert g["harmful_flag_rate"] == 0.6667


def test_the_strict_setting_keeps_its_own_budget_on_the_benign_requests_a_gate_arms():
    """With no calibration benign request armed, the pooled budget lets the strict setting
    flag anything; armed benign answers (TuneSpec.armed) bound it: of those the gate arms,
    at most max_armed_flag may be flagged. An armed answer the gate does not reach
    constrains nothing."""
    harmful = {"none": [[0.95, 0.95, 0.95], [0.7, 0.7, 0.7]], "prefill": [[0.99, 0.2, 0.2]]}
    benign = [[0.75, 0.75, 0.75], [0.1, 0.1, 0.1]]
    hq, bq = {"none": [0.9, 0.95], "prefill": [0.2]}, [0.3, 0.1]
    kw = dict(taus=(0.6, 0.9), windows=(4,), gates=(0.5,), max_benign_flag=0.0)
    armed = [[0.65, 0.65, 0.65], [0.1, 0.1, 0.1]]
    g = gated(harmful, benign, hq, bq, armed=armed, armed_q=[0.96, 0.8], max_armed_flag=0.0, **kw)
    assert g["strict_tau"] == 0.9 and g["harmful_flag_rate"] == 0.6667  # 0.6 would flag the armed look-alike
    assert g["armed_answers"] == 2 and g["armed_flag_rate"] == 0.0
    g = gated(harmful, benign, hq, bq, armed=armed, armed_q=[0.96, 0.8], max_armed_flag=0.5, **kw)
    assert g["strict_tau"] == 0.6 and g["harmful_flag_rate"] == 1.0 and g["armed_flag_rate"] == 0.5
    g = gated(harmful, benign, hq, bq, armed=armed, armed_q=[0.4, 0.3], max_armed_flag=0.0, **kw)
    assert g["strict_tau"] == 0.6 and g["harmful_flag_rate"] == 1.0 and g["armed_gated"] == 0
    assert g["armed_answers"] == 2 and g["armed_flag_rate"] == 0.0  # the normal setting (0.9) watched them
    assert "armed_answers" not in gated(harmful, benign, hq, bq, **kw)
    # the budget holds for every setting: an armed answer the normal setting would flag rules it out too
    g = gated(harmful, benign, hq, bq, armed=[[0.95] * 3], armed_q=[0.3], max_armed_flag=0.0, **kw)
    assert g is None or g["armed_flag_rate"] == 0.0
    rows = sweep(harmful, benign, taus=(0.6, 0.9), windows=(4,), armed=[[0.65, 0.65, 0.65]])
    assert all("armed_flag_rate" in r for r in rows)
    assert choose(rows, max_benign_flag=0.5)["tau"] == 0.6  # flags the 0.7 answer, and the armed look-alike
    assert choose(rows, max_benign_flag=0.5, max_armed_flag=0.0)["tau"] == 0.9
    assert "armed_flag_rate" not in sweep(harmful, benign, taus=(0.6,), windows=(4,))[0]


def test_tune_reads_armed_benign_answers_beside_the_calibration(tiny_dir, rd_home, tmp_path, monkeypatch):
    """`collect` with ``armed``: the benign validation requests whose query score reaches the
    lowest gate, highest first, none of the calibration's own, decoded plainly and kept apart
    from the pooled benign answers; asking for another number keeps the other answers."""
    from rootdefense import tuning
    from rootdefense.api import find_probe
    from rootdefense.models import load_model, normalize_messages

    monkeypatch.setattr(tuning, "BENIGN_SOURCES", ("mtbench", "sensitive", "alarming"))  # not ShareGPT's 861
    save_response_probe(tiny_dir)
    lm = load_model(tiny_dir)
    LinearProbe(torch.randn(48, generator=torch.Generator().manual_seed(7)), 0.0, layer=2, threshold=0.5,
                meta={"model_id": lm.model_id, "kind": "query"}).save(paths.probe_dir(lm.model_id, "query"))
    query = find_probe(lm.model_id, "query")
    spec = TuneSpec(harmful=2, benign=2, attacks=("none",), benign_attacks=("none",), max_new_tokens=3, armed=3)
    path = tmp_path / "calibration.jsonl"
    records = tuning.collect(lm, spec, log=lambda m: None, path=path)
    armed = [r for r in records if r.get("armed")]
    plain = [r for r in records if not r.get("armed")]
    assert len(plain) == 4 and len(armed) == 3
    floor = min(tuning.GATES + (0.5,))
    scores = [r["query_score"] for r in armed]
    assert scores == sorted(scores, reverse=True) and min(scores) >= floor
    assert not {r["prompt"] for r in armed} & {r["prompt"] for r in plain}
    for r in armed:
        assert not r["harmful"] and r["attack"] == "none"
        assert r["query_score"] == tuning.query_score(lm, query, normalize_messages(r["prompt"]))
    assert json.loads(path.read_text().splitlines()[0])["spec"]["armed"] == 3
    # the sweep keeps them apart: pooled benign answers as before, the armed ones counted on their own
    result = tuning.tune(lm, TuneSpec(harmful=2, benign=2, attacks=("none",), benign_attacks=("none",), armed=3,
                                      max_benign_flag=0.5, suspicion_sharegpt=0), log=lambda m: None,
                         records=records)
    assert result["measured"]["benign_answers"] == 2 and result["measured"]["armed_answers"] == 3
    # two armed answers: the four others are kept, the armed ones read again (the same two highest)
    logs = []
    again = tuning.collect(lm, TuneSpec(harmful=2, benign=2, attacks=("none",), benign_attacks=("none",),
                                        max_new_tokens=3, armed=2), log=logs.append, path=path)
    assert any("keeping 4 calibration answers" in m for m in logs)
    assert [r for r in again if not r.get("armed")] == plain
    assert [r["prompt"] for r in again if r.get("armed")] == [r["prompt"] for r in armed[:2]]
    # without armed answers the file's spec is the one earlier releases wrote
    assert "armed" not in tuning._spec_key(TuneSpec())


def test_tune_spec_is_checked():
    with pytest.raises(InputError, match="template attacks"):
        TuneSpec(attacks=("gcg",))
    with pytest.raises(InputError, match="template attacks; got autodan"):
        TuneSpec(benign_attacks=("none", "autodan"))
    with pytest.raises(InputError, match="at least one attack"):
        TuneSpec(benign_attacks=())
    with pytest.raises(InputError, match="max_benign_flag"):
        TuneSpec(max_benign_flag=1.5)
    with pytest.raises(InputError, match=">= 1 harmful"):
        TuneSpec(harmful=0)
    with pytest.raises(InputError, match="steer_tau"):
        TuneSpec(steer_tau=1.0)
    with pytest.raises(InputError, match="armed must be an integer"):
        TuneSpec(armed=-1)
    with pytest.raises(InputError, match="max_armed_flag"):
        TuneSpec(max_armed_flag=1.0)
    from rootdefense.correction import CorrectionSettings

    with pytest.raises(InputError, match="blend must lie"):
        CorrectionSettings(blend=1.0).validate()
    assert CorrectionSettings(blend=0.25).reads_request and not CorrectionSettings().reads_request


def test_calibration_prompts_are_ones_no_probe_was_fitted_on():
    """Tuning measures benign flags on requests the probes never fitted: the validation
    split, and the edgy train half's held-out buckets (the probes fit its 'fit' bucket, so
    those requests score low by construction). Never a test-split or edgy-eval prompt."""
    harmful, benign = calibration_prompts(TuneSpec(harmful=40, benign=40))
    assert len(harmful) == 40 and len(benign) == 40
    assert all(split_of(e.prompt) == "val" for e in harmful)
    edgy = [e for e in benign if e.id.startswith("edgy-")]
    assert len(edgy) >= 8  # the edgy requests are a real share of the benign side
    assert all(edgy_half(e.prompt) == "train" and split_of(e.prompt) != "fit" for e in edgy)
    assert all(split_of(e.prompt) == "val" for e in benign if e.id.split("-")[0] not in ("edgy", "alarming"))
    # the project's sensitive questions take part too, from their validation split only
    assert sum(e.id.startswith("sensitive-") for e in benign) >= 6
    # and its alarming ones from their own validation part (their test part measures over-refusal)
    alarming = [e for e in benign if e.id.startswith("alarming-")]
    assert len(alarming) >= 6 and all(alarming_part(e.prompt) == "val" for e in alarming)


def _write_defaults(home, model_id, **settings):
    folder = home / "probes" / paths.model_slug(model_id) / "response"
    return defaults.save_defaults(folder, {"model_id": model_id, "defense": "rds-expert",
                                           "settings": {"tau": 0.8, "window": 4, "k": 2, "use_expert": True,
                                                        "rollback": "sentence", **settings}})


def test_settings_resolve_from_tuned_defaults_presets_and_flags(rd_home):
    model = "some/model"
    s = resolve_settings(model)
    assert (s.defense, s.rule) == ("rds", "threshold") and "fallback" in s.source
    _write_defaults(rd_home, model)
    s = resolve_settings(model)
    assert s.defense == "rds-expert" and s.tau == 0.8 and s.rollback == "sentence"
    # no expert trained for this model: steer among the base model's own candidates, and say so
    assert s.correction == {"window": 4, "k": 2, "use_expert": False} and "expert not trained" in s.source
    notes = defaults.fallback_notes(model, s.correction)  # what the CLI prints, from data, not wording
    assert len(notes) == 1 and notes[0].startswith("expert not trained") and "expert train --model some/model" in notes[0]
    assert defaults.fallback_notes(model, resolve_settings(model, defense="rds").correction) == []
    (rd_home / "experts" / paths.model_slug(model)).mkdir(parents=True)
    (rd_home / "experts" / paths.model_slug(model) / "adapter_config.json").write_text("{}")
    s = resolve_settings(model, tau=0.5, correction={"k": 3})  # flags win over the tuned file
    assert s.tau == 0.5 and s.correction == {"window": 4, "k": 3, "use_expert": True}
    assert defaults.fallback_notes(model, s.correction) == []
    # the tuned preset drafts (lossless); an explicit drafter, the paper preset and undefended decoding do not change
    assert s.drafter == "auto" and resolve_settings(model, drafter="none").drafter == "none"
    assert resolve_settings(model, preset="paper").drafter is None
    assert resolve_settings(model, defense="none").drafter is None
    assert resolve_settings(model, rule="weighted").drafter is None
    other = resolve_settings(model, defense="rds")  # another defense: no tuned settings, and the source says why
    assert other.defense == "rds" and "tuned defaults are for rds-expert" in other.source
    r = resolve_settings(model, rule="weighted")  # a rule alone asks for the token rule
    assert (r.defense, r.rule) == ("rds", "weighted")
    p = resolve_settings(model, preset="paper")
    assert (p.defense, p.rule, p.k) == ("rds", "paper", 10) and "paper" in p.source
    with pytest.raises(InputError, match="'paper' preset is an rds setting"):
        resolve_settings(model, preset="paper", defense="rds-expert")
    with pytest.raises(InputError, match="unknown preset"):
        resolve_settings(model, preset="fast")


def test_a_tuned_gate_needs_the_query_probe(rd_home):
    """Defaults with a gate: without a query probe the gate is dropped (one monitor, said in
    the source); with one it is kept, and a flag still overrides a gate setting."""
    model = "gated/model"
    gate = {"gate": 0.5, "strict_tau": 0.6, "strict_window": 8, "strict_k": 5}
    _write_defaults(rd_home, model, **gate)
    s = resolve_settings(model)
    assert "gate" not in s.correction and "query probe not trained, no gate" in s.source
    assert [n for n in defaults.fallback_notes(model, s.correction) if n.startswith("query probe not trained")]
    folder = rd_home / "probes" / paths.model_slug(model) / "query"
    folder.mkdir(parents=True)
    (folder / "probe.json").write_text("{}")
    s = resolve_settings(model, correction={"strict_k": 4})
    assert {k: s.correction[k] for k in gate} == {**gate, "strict_k": 4} and "no gate" not in s.source


def test_a_broken_defaults_file_is_a_clear_error(rd_home):
    path = _write_defaults(rd_home, "m")
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot be read.*rootdefense tune"):
        resolve_settings("m")
    path.write_text(json.dumps({"defense": "rds"}))
    with pytest.raises(InputError, match="not a rootdefense defaults file"):
        resolve_settings("m")


def test_shipped_defaults_exist_for_the_embedded_model(rd_home):
    d = defaults.load_defaults("smollm2-135m")
    assert d is not None and d["source"].startswith("shipped")
    assert d["defense"] == "rds-expert" and 0 < d["settings"]["tau"] < 1
    assert d["measured"]["benign_prompts"] >= 40 and "sweep" in d
    # a probe trained here instead of the shipped one: the settings say how to get it back
    save_response_probe("smollm2-135m")
    assert defaults.load_defaults("smollm2-135m")["probe_matches"] is False
    assert "prepare --reinstall" in resolve_settings("smollm2-135m").source


def test_probe_retrained_since_tuning_is_noticed(rd_home):
    model = "x/y"
    folder = rd_home / "probes" / paths.model_slug(model) / "response"
    LinearProbe(torch.zeros(4), 0.0, layer=1, threshold=0.5, meta={"model_id": model}).save(folder)
    _write_defaults(rd_home, model, tau=0.7)
    data = json.loads((folder / defaults.FILE).read_text())
    data["probe_sha256"] = defaults.weights_sha256(folder)
    (folder / defaults.FILE).write_text(json.dumps(data))
    assert defaults.load_defaults(model)["probe_matches"] is True
    LinearProbe(torch.ones(4), 0.0, layer=1, threshold=0.5, meta={"model_id": model}).save(folder)
    assert defaults.load_defaults(model)["probe_matches"] is False
    assert "earlier probe" in resolve_settings(model).source
    # tuned with a gate: a retrained query probe is noticed too
    query = rd_home / "probes" / paths.model_slug(model) / "query"
    LinearProbe(torch.zeros(4), 0.0, layer=1, threshold=0.5, meta={"model_id": model}).save(query)
    data.update(probe_sha256=defaults.weights_sha256(folder), query_probe_sha256=defaults.weights_sha256(query))
    (folder / defaults.FILE).write_text(json.dumps(data))
    assert defaults.load_defaults(model)["probe_matches"] is True
    LinearProbe(torch.ones(4), 0.0, layer=1, threshold=0.5, meta={"model_id": model}).save(query)
    assert defaults.load_defaults(model)["probe_matches"] is False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tune-model"), max_positions=4096)


def test_cli_tune_writes_defaults_that_generate_then_uses(tiny_dir, rd_home, tmp_path):
    save_response_probe(tiny_dir)
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--harmful", "3", "--benign", "3",
                                 "--max-new-tokens", "6", "--max-benign-flag", "0.5"])
    assert r.exit_code == 0, r.output
    saved = json.loads((paths.probe_dir(tiny_dir) / defaults.FILE).read_text())
    m = saved["measured"]
    assert m["harmful_prompts"] == 3 and m["benign_prompts"] == 3 and m["benign_answers"] == 6
    assert m["attacks"] == ["none", "prefill", "roleplay"] and m["benign_attacks"] == ["none", "roleplay"]
    assert m["chosen"]["benign_flag_rate"] <= 0.5 and saved["probe_sha256"] == defaults.weights_sha256(
        paths.probe_dir(tiny_dir))
    assert saved["settings"]["end_check"] is True  # chosen by evaluation, not replayed
    assert ("gate" in saved["settings"]) == (saved["settings"].get("loop_expert") == "gated")
    r = CliRunner().invoke(cli, ["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["defense"] == "rds-expert" and settings["tau"] == saved["settings"]["tau"]
    assert settings["settings_source"].startswith("tuned defaults")
    # the calibration answers were kept: --reuse re-sweeps them (here with another budget)
    calib = paths.probe_dir(tiny_dir) / "calibration.jsonl"
    assert len(calib.read_text().splitlines()) == 1 + 3 * 3 + 3 * 2 + 1
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--harmful", "3", "--benign", "3",
                                 "--max-new-tokens", "6", "--max-benign-flag", "0.0", "--reuse", "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["measured"]["chosen"]["benign_flag_rate"] == 0.0 and again["measured"]["harmful_prompts"] == 3
    assert "steer_tau" not in again["settings"]
    # a steering threshold chosen elsewhere is saved with the settings and reaches generate
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--harmful", "3", "--benign", "3",
                                 "--max-new-tokens", "6", "--max-benign-flag", "0.5", "--reuse", "--steer-tau", "0.4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["settings"]["steer_tau"] == 0.4, r.output
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--harmful", "2", "--benign", "3",
                                 "--max-new-tokens", "6", "--reuse"])
    assert r.exit_code != 0 and "other tuning settings" in r.output
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--attacks", "gcg"])
    assert r.exit_code == 2 and "template attacks" in r.output
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--suspicion-sharegpt", "-1"])
    assert r.exit_code == 2 and "suspicion_sharegpt must be an integer >= 0" in r.output
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--max-armed-flag", "1.5"])
    assert r.exit_code == 2 and "max_armed_flag must lie in [0, 1)" in r.output
    r = CliRunner().invoke(cli, ["tune", "--model", tiny_dir, "--armed", "-1"])
    assert r.exit_code == 2 and "--armed" in r.output


def test_defaults_name_probe_files_as_probes_write_them():
    from rootdefense.probes import base

    assert defaults.PROBE_FILES == (base.WEIGHTS, base.META)


def test_tuned_probes_ship_and_install_bit_for_bit(rd_home, tmp_path, monkeypatch):
    """`ship_tuned` copies the tuned defaults with the probes they were measured with; a
    fresh home installs those probes (not retrained ones), so the defaults match them."""
    model = "x/y"
    folder = paths.probe_dir(model)
    query = paths.probe_dir(model, "query")
    LinearProbe(torch.randn(4), 0.1, layer=1, threshold=0.5, meta={"model_id": model, "kind": "response"}).save(folder)
    LinearProbe(torch.randn(4), 0.2, layer=2, threshold=0.3, meta={"model_id": model, "kind": "query"}).save(query)
    path = _write_defaults(rd_home, model, gate=0.5)
    data = json.loads(path.read_text())
    data.update(probe_sha256=defaults.weights_sha256(folder), query_probe_sha256=defaults.weights_sha256(query))
    path.write_text(json.dumps(data))
    pkg = tmp_path / "tuned"
    written = defaults.ship_tuned(model, pkg)
    target = pkg / f"{paths.model_slug(model)}.json"
    assert target in written and json.loads(target.read_text()) == data
    shipped = {p.name: p for p in written if p.is_dir()}
    assert set(shipped) == {"response", "query"}  # no paper probe in this home: none shipped
    monkeypatch.setattr(defaults, "shipped_probe_dir",
                        lambda m, kind: shipped.get(kind) if m == model else None)
    monkeypatch.setenv("ROOTDEFENSE_HOME", str(tmp_path / "fresh"))
    for kind in ("response", "query"):
        dest = defaults.install_shipped_probe(model, kind, paths.probe_dir(model, kind), 4, 3)
        assert defaults.weights_sha256(dest) == defaults.weights_sha256(shipped[kind])
    assert defaults.install_shipped_probe(model, "paper", tmp_path / "p", 4, 3) is None
    # the shipped defaults file sits beside the fresh probes and matches them
    defaults.save_defaults(paths.probe_dir(model), {k: v for k, v in json.loads(target.read_text()).items()
                                                         if k != "format_version"})
    assert defaults.load_defaults(model)["probe_matches"] is True
    # a shipped probe for another model or size is refused before it is installed
    with pytest.raises(ProbeError, match="hidden size"):
        defaults.install_shipped_probe(model, "response", tmp_path / "q", 8, 3)
    assert not (tmp_path / "q").exists()


def test_the_expert_ships_and_installs_with_the_defaults(rd_home, tmp_path, monkeypatch):
    from rootdefense.errors import ExpertError
    from rootdefense.paths import expert_dir

    model = "x/y"
    folder = paths.probe_dir(model)
    LinearProbe(torch.randn(4), 0.1, layer=1, threshold=0.5, meta={"model_id": model}).save(folder)
    path = _write_defaults(rd_home, model)
    data = json.loads(path.read_text())
    data["probe_sha256"] = defaults.weights_sha256(folder)
    path.write_text(json.dumps(data))
    trained = expert_dir(model)
    trained.mkdir(parents=True)
    (trained / "adapter_model.safetensors").write_bytes(b"weights")
    (trained / "expert.json").write_text(json.dumps({"model_id": model, "hidden_size": 4}))
    (trained / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/this/machine", "r": 16}))
    written = defaults.ship_tuned(model, tmp_path / "tuned")
    shipped = tmp_path / "tuned" / paths.model_slug(model) / "expert"
    assert shipped in written
    assert (shipped / "adapter_model.safetensors").read_bytes() == b"weights"
    config = json.loads((shipped / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": model, "r": 16}  # no path of the machine it was trained on
    monkeypatch.setattr(defaults, "shipped_expert_dir", lambda m: shipped if m == model else None)
    monkeypatch.setenv("ROOTDEFENSE_HOME", str(tmp_path / "fresh"))
    dest = defaults.install_shipped_expert(model, expert_dir(model), 4)
    assert dest == expert_dir(model) and {p.name for p in dest.iterdir()} == set(defaults.EXPERT_FILES)
    assert defaults.install_shipped_expert("other", tmp_path / "o", 4) is None
    with pytest.raises(ExpertError, match="hidden size 4"):
        defaults.install_shipped_expert(model, tmp_path / "e", 8)
    assert not (tmp_path / "e").exists()


def test_shipping_defaults_tuned_for_other_probes_is_refused(rd_home, tmp_path):
    model = "x/y"
    folder = paths.probe_dir(model)
    LinearProbe(torch.zeros(4), 0.0, layer=1, threshold=0.5, meta={"model_id": model}).save(folder)
    with pytest.raises(InputError, match="no tuned defaults"):
        defaults.ship_tuned(model, tmp_path / "tuned")
    path = _write_defaults(rd_home, model)
    data = json.loads(path.read_text())
    data["probe_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="other probes"):
        defaults.ship_tuned(model, tmp_path / "tuned")
    assert not (tmp_path / "tuned").exists()


def test_cli_prepare_installs_shipped_probes_or_trains_with_the_flag(tiny_dir, rd_home, tmp_path, monkeypatch):
    """`prepare` installs what the package ships (probes, expert) and trains only what it
    lacks; `--train-probes` trains every missing probe here instead."""
    import rootdefense.probes.train as probe_train
    from rootdefense.models import load_model
    from rootdefense.paths import expert_dir

    lm = load_model(tiny_dir)
    shipped = {}
    for kind in ("response", "query"):  # the package ships these two; 'paper' must be trained
        shipped[kind] = tmp_path / "pkg" / kind
        LinearProbe(torch.randn(lm.hidden_size), 0.0, layer=1, threshold=0.5,
                    meta={"model_id": lm.model_id, "kind": kind}).save(shipped[kind])
    monkeypatch.setattr(defaults, "shipped_probe_dir", lambda m, kind: shipped.get(kind) if m == lm.model_id else None)
    monkeypatch.setattr(defaults, "shipped_expert_dir", lambda m: None)
    trained = []

    def fake_train(lm_, spec, log=print):
        trained.append(spec.kind)
        probe = LinearProbe(torch.zeros(lm_.hidden_size), 0.0, layer=1, threshold=0.5,
                            meta={"model_id": lm_.model_id, "kind": spec.kind})
        return probe, {"test_auroc": 0.5}

    monkeypatch.setattr(probe_train, "train_probe", fake_train)
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])
    assert r.exit_code == 0, r.output
    assert trained == ["paper"] and r.output.count("shipped with rootdefense") == 2
    for kind in ("response", "query"):
        assert defaults.weights_sha256(paths.probe_dir(tiny_dir, kind)) == defaults.weights_sha256(shipped[kind])
    assert not expert_dir(tiny_dir).exists() and "expert ready" not in r.output
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])  # cached: nothing installed or trained again
    assert r.exit_code == 0 and r.output.count("probe ready") == 3 and trained == ["paper"]
    for kind in ("response", "query", "paper"):
        (paths.probe_dir(tiny_dir, kind) / "probe.json").unlink()
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir, "--train-probes"])
    assert r.exit_code == 0, r.output
    assert trained == ["paper", "response", "paper", "query"] and "shipped with rootdefense" not in r.output
    # probes trained here: --reinstall puts the shipped ones back (and only those the package has)
    for kind in ("response", "query"):
        assert defaults.weights_sha256(paths.probe_dir(tiny_dir, kind)) != defaults.weights_sha256(shipped[kind])
    paper = defaults.weights_sha256(paths.probe_dir(tiny_dir, "paper"))
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir, "--reinstall"])
    assert r.exit_code == 0, r.output
    assert r.output.count("shipped with rootdefense") == 2 and len(trained) == 4
    for kind in ("response", "query"):
        assert defaults.weights_sha256(paths.probe_dir(tiny_dir, kind)) == defaults.weights_sha256(shipped[kind])
    assert defaults.weights_sha256(paths.probe_dir(tiny_dir, "paper")) == paper
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir, "--reinstall", "--train-probes"])
    assert r.exit_code == 2 and "choose one" in r.output


def _probe(model, kind, folder, seed):
    g = torch.Generator().manual_seed(seed)
    LinearProbe(torch.randn(4, generator=g), 0.1, layer=1, threshold=0.5,
                meta={"model_id": model, "kind": kind}).save(folder)
    return defaults.weights_sha256(folder)


def test_shipping_new_probes_records_the_ones_they_replace(rd_home, tmp_path):
    """A release that ships a retrained probe lists the one it replaces in the package's
    history, so `prepare` can tell an earlier release's probe from one trained here."""
    model = "x/y"
    pkg = tmp_path / "tuned"

    def tune_and_ship():
        path = _write_defaults(rd_home, model)
        data = json.loads(path.read_text())
        data["probe_sha256"] = defaults.weights_sha256(paths.probe_dir(model))
        path.write_text(json.dumps(data))
        defaults.ship_tuned(model, pkg)

    first = _probe(model, "response", paths.probe_dir(model), 1)
    paper = _probe(model, "paper", paths.probe_dir(model, "paper"), 2)
    tune_and_ship()
    history = pkg / paths.model_slug(model) / defaults.HISTORY
    assert not history.exists()  # nothing replaced yet
    second = _probe(model, "response", paths.probe_dir(model), 3)
    tune_and_ship()
    assert json.loads(history.read_text()) == {"response": [first]}  # the unchanged paper probe is not listed
    _probe(model, "response", paths.probe_dir(model), 4)
    tune_and_ship()
    assert json.loads(history.read_text()) == {"response": [first, second]}
    assert paper not in history.read_text()


def test_prepare_updates_an_earlier_release_and_keeps_what_was_trained_here(tiny_dir, rd_home, tmp_path, monkeypatch):
    """A home prepared by an earlier release holds that release's shipped probes: `prepare`
    replaces them with this release's (its shipped defaults were measured with those). A
    probe trained here, or one the user's own tuned defaults were measured with, is kept."""
    import rootdefense.probes.train as probe_train
    from rootdefense.models import load_model

    lm = load_model(tiny_dir)
    kinds = ("response", "query", "paper")
    old = {k: tmp_path / "old" / k for k in kinds}
    new = {k: tmp_path / "new" / k for k in kinds}
    for i, k in enumerate(kinds):
        for j, pkg in enumerate((old, new)):
            LinearProbe(torch.randn(lm.hidden_size), 0.0, layer=1, threshold=0.5,
                        meta={"model_id": lm.model_id, "kind": k, "seed": 10 * i + j}).save(pkg[k])
    shipped = {"now": old}
    monkeypatch.setattr(defaults, "shipped_probe_dir",
                        lambda m, kind: shipped["now"][kind] if m == lm.model_id else None)
    monkeypatch.setattr(defaults, "shipped_expert_dir", lambda m: None)
    monkeypatch.setattr(probe_train, "train_probe", lambda *a, **kw: pytest.fail("nothing is trained"))
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])  # the earlier release prepares the home
    assert r.exit_code == 0, r.output
    sha = {k: defaults.weights_sha256(paths.probe_dir(tiny_dir, k)) for k in kinds}
    assert sha == {k: defaults.weights_sha256(old[k]) for k in kinds}
    # the new release: other probes, the earlier ones in its history; the paper probe was trained here
    shipped["now"] = new
    monkeypatch.setattr(defaults, "earlier_shipped", lambda m: {k: [sha[k]] for k in kinds} if m == lm.model_id else {})
    own_paper = _probe(tiny_dir, "paper", paths.probe_dir(tiny_dir, "paper"), 5)
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])
    assert r.exit_code == 0, r.output
    assert r.output.count("probe updated") == 2 and "replaces an earlier release's" in r.output
    for k in ("response", "query"):
        assert defaults.weights_sha256(paths.probe_dir(tiny_dir, k)) == defaults.weights_sha256(new[k])
    assert defaults.weights_sha256(paths.probe_dir(tiny_dir, "paper")) == own_paper
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])  # up to date: nothing replaced again
    assert r.exit_code == 0 and r.output.count("probe ready") == 3 and "updated" not in r.output
    # the user tuned on the earlier release's response probe: their defaults keep it
    import shutil

    shutil.rmtree(paths.probe_dir(tiny_dir, "response"))
    shutil.copytree(old["response"], paths.probe_dir(tiny_dir, "response"))
    path = _write_defaults(rd_home, tiny_dir)
    data = json.loads(path.read_text())
    data["probe_sha256"] = sha["response"]
    path.write_text(json.dumps(data))
    assert not defaults.superseded(tiny_dir, "response", paths.probe_dir(tiny_dir, "response"))
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir])
    assert r.exit_code == 0 and "updated" not in r.output
    assert defaults.weights_sha256(paths.probe_dir(tiny_dir, "response")) == sha["response"]
    # --train-probes never swaps a probe for a shipped one
    path.unlink()
    assert defaults.superseded(tiny_dir, "response", paths.probe_dir(tiny_dir, "response"))
    r = CliRunner().invoke(cli, ["prepare", "--model", tiny_dir, "--train-probes"])
    assert r.exit_code == 0 and "updated" not in r.output


def test_an_earlier_release_expert_is_superseded(rd_home, tmp_path, monkeypatch):
    from rootdefense.paths import expert_dir

    model = "x/y"
    folder = expert_dir(model)
    folder.mkdir(parents=True)
    (folder / defaults.EXPERT_FILES[0]).write_bytes(b"old weights")
    old = defaults.weights_sha256(folder, defaults.EXPERT_FILES[0])
    monkeypatch.setattr(defaults, "earlier_shipped", lambda m: {"expert": [old]})
    assert defaults.superseded(model, "expert", folder)
    assert not defaults.superseded(model, "response", folder)  # no probe weights there
    (folder / defaults.EXPERT_FILES[0]).write_bytes(b"trained here")
    assert not defaults.superseded(model, "expert", folder)


def test_the_package_history_lists_the_earlier_embedded_probes():
    history = defaults.earlier_shipped("smollm2-135m")
    assert set(history) <= {*defaults.SHIPPED_KINDS, "expert"} and history["response"]
    for kind, shas in history.items():
        current = defaults.shipped_expert_dir("smollm2-135m") if kind == "expert" else \
            defaults.shipped_probe_dir("smollm2-135m", kind)
        name = defaults.EXPERT_FILES[0] if kind == "expert" else defaults.PROBE_FILES[0]
        assert defaults.weights_sha256(current, name) not in shas and all(len(s) == 64 for s in shas)


def test_tune_sets_the_suspicion_check_just_above_every_benign_prompt(tiny_dir, rd_home, monkeypatch):
    """Where a gate or blend is chosen, tune reads benign prompts' suspicion and sets
    suspect_nll past the highest (0.2-nat margin, rounded up to a half nat); without a
    query probe, or with --suspicion-sharegpt 0, there is no check."""
    from rootdefense import tuning
    from rootdefense.models import load_model

    save_response_probe(tiny_dir)
    lm = load_model(tiny_dir)
    prompts = ["How do I bake bread?", "Give me three ideas for a birthday party in the garden",
               "zq xv 9f kk 0p ]] wq mm ,, ;; 7y rr", "hi"]
    monkeypatch.setattr(tuning, "suspicion_prompts", lambda spec: prompts)
    # the records of test_the_gate_flags_what_no_single_setting_can: the gate wins within the budget
    rows = [("none", True, [0.95] * 3, 0.9), ("none", True, [0.7] * 3, 0.95), ("prefill", True, [0.99, 0.2, 0.2], 0.2),
            ("none", False, [0.75] * 3, 0.3), ("none", False, [0.1] * 3, 0.1)]

    def records(with_query):
        return [{"attack": a, "harmful": h, "prompt": f"p{i}", "answer": "Sure.", "harms": harms,
                 "query_score": q if with_query else None} for i, (a, h, harms, q) in enumerate(rows)]

    spec = TuneSpec(attacks=("none", "prefill"), benign_attacks=("none",), max_benign_flag=0.0)
    assert "suspect_nll" not in tuning.tune(lm, spec, log=lambda m: None, records=records(False))["settings"]
    _probe(lm.model_id, "query", paths.probe_dir(lm.model_id, "query"), seed=3)
    result = tuning.tune(lm, spec, log=lambda m: None, records=records(True))
    assert "gate" in result["settings"] or "blend" in result["settings"]
    want = tuning.suspicion_threshold(lm, prompts)
    top = want["max_benign"]
    assert result["settings"]["suspect_nll"] == want["suspect_nll"] and result["settings"]["suspect_window"] == 8
    assert top + 0.2 <= want["suspect_nll"] < top + 0.2 + 0.5 and want["suspect_nll"] % 0.5 == 0
    assert result["measured"]["suspicion"] == want and want["prompts"] == 4 and top > 0
    off = TuneSpec(attacks=("none", "prefill"), benign_attacks=("none",), max_benign_flag=0.0, suspicion_sharegpt=0)
    assert "suspect_nll" not in tuning.tune(lm, off, log=lambda m: None, records=records(True))["settings"]
    with pytest.raises(InputError, match="suspicion_sharegpt"):
        TuneSpec(suspicion_sharegpt=-1)


def test_suspicion_prompts_are_sharegpt_turns_and_benign_validation_prompts():
    from rootdefense.data.loaders import load_dataset
    from rootdefense.tuning import suspicion_prompts

    prompts = suspicion_prompts(TuneSpec(suspicion_sharegpt=5))
    assert prompts[:5] == [e.prompt for e in load_dataset("sharegpt", limit=5)]
    assert len(prompts) == len(set(prompts)) > 5
    test_alarming = {e.prompt for e in load_dataset("alarming") if alarming_part(e.prompt) == "test"}
    assert test_alarming and not test_alarming & set(prompts)
