"""The evaluation harness end to end on a tiny model saved to a folder: planning, results
lines, resume, refusal to mix configs, summary, report, CLI; and the summary arithmetic on
hand-made result lines."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    save_tiny_model,
)

from rootdefense import paths
from rootdefense.cli import cli
from rootdefense.errors import InputError
from rootdefense.evaluation import EvalConfig, run_eval, write_outputs
from rootdefense.evaluation.summary import summarize
from rootdefense.jsonl import read_objects
from rootdefense.probes.base import LinearProbe
from rootdefense.stats import wilson


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-eval-model"), max_positions=8192)


@pytest.fixture()
def home_with_probe(tiny_dir, rd_home):
    g = torch.Generator().manual_seed(5)
    folder = rd_home / "probes" / paths.model_slug(tiny_dir) / "response"
    LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                meta={"model_id": tiny_dir, "kind": "response"}).save(folder)
    return rd_home


def small_config(tiny_dir, **over) -> EvalConfig:
    data = {"model": tiny_dir, "datasets": ["advbench", "mtbench"], "attacks": ["none", "prefill", "dan"],
            "defenses": ["none", "self-reminder", "rds"], "judges": ["refusal"], "limit": 2,
            "generation": {"max_new_tokens": 6}, "threads": 1}
    data.update(over)
    return EvalConfig.from_dict(data)


# --------------------------------------------------------------------------- config


def test_config_rejects_unknown_names_and_lists_valid_ones():
    with pytest.raises(InputError, match=r"unknown attack name\(s\) 'gcgx'.*valid: none"):
        EvalConfig.from_dict({"attacks": ["none", "gcgx"]})
    with pytest.raises(InputError, match=r"unknown dataset.*'imdb'.*valid: advbench"):
        EvalConfig.from_dict({"datasets": "advbench,imdb"})
    with pytest.raises(InputError, match=r"unknown defense.*valid: none"):
        EvalConfig.from_dict({"defenses": ["rds", "llamaguard"]})
    with pytest.raises(InputError, match=r"unknown defense.*'llamaguard@x'"):
        EvalConfig.from_dict({"defenses": ["rds", "llamaguard@x"]})
    with pytest.raises(InputError, match=r"unknown defense.*'rds@'"):
        EvalConfig.from_dict({"defenses": ["rds@"]})
    with pytest.raises(InputError, match=r"unknown attack.*'none@x'"):  # only defenses have variants
        EvalConfig.from_dict({"attacks": ["none@x"]})


def test_defense_variants_take_base_options_overlaid_with_their_own():
    """An ablation is the same defense under another name with its own options."""
    from rootdefense.evaluation.runner import _build

    cfg = EvalConfig.from_dict({"defenses": ["rds", "rds@strict"],
                                "options": {"rds": {"k": 5}, "rds@strict": {"tau": 0.2}}})
    assert cfg.defenses == ["rds", "rds@strict"]
    calls = []
    _build(lambda name, **o: calls.append((name, o)), "rds", cfg.options)
    _build(lambda name, **o: calls.append((name, o)), "rds@strict", cfg.options)
    assert calls == [("rds", {"k": 5}), ("rds", {"k": 5, "tau": 0.2})]


def test_config_type_errors_name_the_key(tmp_path):
    with pytest.raises(InputError, match="'limit' must be a positive integer or null"):
        EvalConfig.from_dict({"limit": "ten"})
    with pytest.raises(InputError, match="'generation.max_new_tokens' must be a number"):
        EvalConfig.from_dict({"generation": {"max_new_tokens": "64"}})
    with pytest.raises(InputError, match="unknown key 'generation.beam'"):
        EvalConfig.from_dict({"generation": {"beam": 4}})
    with pytest.raises(InputError, match="'dataset_options.gsm8k.limit' must be an integer"):
        EvalConfig.from_dict({"dataset_options": {"gsm8k": {"limit": 2.5}}})
    with pytest.raises(InputError, match="unknown key.*valid keys"):
        EvalConfig.from_dict({"atacks": ["none"]})
    with pytest.raises(InputError, match="'samples' > 1 needs generation.temperature"):
        EvalConfig.from_dict({"samples": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [none\n")
    with pytest.raises(InputError, match="not valid YAML"):
        EvalConfig.from_yaml(bad)
    with pytest.raises(InputError, match="does not exist"):
        EvalConfig.from_yaml(tmp_path / "missing.yaml")


def test_config_flags_override_file_and_fingerprint_tracks_answers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("attacks: [none, prefill]\nlimit: 5\ngeneration: {max_new_tokens: 32}\n")
    cfg = EvalConfig.from_yaml(f)
    over = cfg.override(limit=3, max_new_tokens=16, attacks=None)
    assert (over.limit, over.generation["max_new_tokens"], over.attacks) == (3, 16, ["none", "prefill"])
    assert cfg.fingerprint() != cfg.override(max_new_tokens=16).fingerprint()
    partial = EvalConfig.from_dict({"generation": {"temperature": 0}})
    assert partial.generation == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}
    assert partial.fingerprint() == EvalConfig.from_dict({}).fingerprint()
    assert cfg.fingerprint() != over.fingerprint()
    assert cfg.fingerprint() == cfg.override(threads=2).fingerprint()  # threads do not change answers
    assert cfg.fingerprint() == cfg.override(limit=9, attacks="none,dan").fingerprint()  # nor does the selection


def test_benign_prompts_can_be_asked_inside_wrappers():
    from rootdefense.evaluation.runner import plan

    cfg = EvalConfig.from_dict({"datasets": ["advbench", "alarming"], "attacks": ["none", "dan"],
                                "benign_attacks": "none,roleplay,fiction", "defenses": ["none"]})
    from rootdefense.data.split import held_out

    examples = {"advbench": held_out("advbench", 2), "alarming": held_out("alarming", 2)}
    _, items = plan(cfg, examples)
    asked = {(it["dataset"], it["attack"]) for it in items}
    assert asked == {("advbench", "none"), ("advbench", "dan"), ("alarming", "none"), ("alarming", "roleplay"),
                     ("alarming", "fiction")}
    assert EvalConfig.from_dict({}).benign_attacks == ["none"]  # plain benign prompts by default
    with pytest.raises(InputError, match="benign_attacks.*optimise"):
        EvalConfig.from_dict({"benign_attacks": ["none", "gcg"]})
    with pytest.raises(InputError, match="unknown"):
        EvalConfig.from_dict({"benign_attacks": ["nope"]})


def test_caught_answers_are_counted_by_how_they_end():
    lines = [{"kind": "run", "config": {"defenses": ["rds-expert"], "attacks": ["none"], "judges": ["refusal"]}}]
    endings = [("I can't help with that.", "closed", {"rollbacks": 1, "closed": "loop"}),
               ("I can't help with that. I am not going to", "degenerate", {"rollbacks": 1, "degeneration_stops": 1}),
               ("I'm sorry, I can't. If you", "length", {"loop_restarts": 1}),
               ("Sure, step one is", "length", {})]  # never caught
    for i, (answer, finish, trace) in enumerate(endings):
        lines.append({**_res("rds-expert", "none", True, False, pid=f"h{i}", answer=answer), "finish_reason": finish,
                      "trace": trace})
    cell = summarize(lines)["attack_success"]["rds-expert"]["by_attack"]["none"]
    assert cell["caught"]["k"] == 3 and cell["caught_clean_end"]["k"] == 1 and cell["caught_clean_end"]["n"] == 3
    assert cell["caught_by_finish"] == {"closed": 1, "degenerate": 1, "length": 1}
    assert (cell["loop_closed"]["k"], cell["loop_cut"]["k"]) == (1, 1)


def test_benign_summary_compares_each_wrapped_answer_with_its_own_undefended_one():
    lines = [{"kind": "run", "config": {"defenses": ["none", "rds"], "attacks": ["none"], "judges": ["refusal"]}}]
    for attack in ("none", "roleplay"):
        for i in range(2):
            lines.append(_res("none", attack, False, False, dataset="alarming", pid=f"b{i}", answer=f"{attack}{i}"))
            refused = attack == "roleplay" and i == 0
            lines.append(_res("rds", attack, False, False, refusal=refused, dataset="alarming", pid=f"b{i}",
                              answer="I can't." if refused else f"{attack}{i}"))
    b = summarize(lines)["benign"]["rds"]
    assert b["all"]["identical_to_none"]["rate"] == 0.75
    assert b["by_attack"]["none"]["identical_to_none"]["rate"] == 1.0
    assert b["by_attack"]["roleplay"]["over_refusal"]["rate"] == 0.5
    assert "by_attack" not in summarize([x for x in lines if x.get("attack") != "roleplay"])["benign"]["rds"]


# --------------------------------------------------------------------------- runs


def test_eval_runs_resumes_and_refuses_to_mix(tiny_dir, home_with_probe, tmp_path):
    cfg = small_config(tiny_dir)
    out = tmp_path / "run"
    summary = run_eval(cfg, out, progress=False)
    lines = read_objects(out / "results.jsonl")
    results = [o for o in lines if o["kind"] == "result"]
    # 2 advbench x 3 attacks x 3 defenses + 2 mtbench x 1 attack x 3 defenses
    assert len(results) == 2 * 3 * 3 + 2 * 3 == summary["run"]["results"] == lines[0]["planned"]
    assert lines[0]["kind"] == "run" and lines[0]["config_hash"] == cfg.fingerprint()
    assert lines[0]["answer_settings"]["generation"]["max_new_tokens"] == 6
    assert len({r["key"] for r in results}) == len(results)
    assert not [r["error"] for r in results if "error" in r]
    for r in results:
        assert set(r["verdicts"]) == {"refusal"} and "answer" in r and r["tokens"] <= 6
        assert r["harmful"] == (r["dataset"] == "advbench")
    benign = [r for r in results if not r["harmful"]]
    assert all(r["attack"] == "none" and r["metrics"]["ppl_base"] > 0 for r in benign)
    # undefended benign answers are identical to themselves; the page and summary exist
    assert summary["benign"]["none"]["all"]["identical_to_none"]["rate"] == 1.0
    assert (out / "summary.json").exists() and "<svg" in (out / "report.html").read_text()

    # interrupt: keep the header and 5 results plus a torn line, then resume
    raw = (out / "results.jsonl").read_text().splitlines()
    kept = [raw[0], raw[1]] + [ln for ln in raw[2:] if '"kind": "result"' in ln][:5]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n" + kept[-1][:30])
    with pytest.raises(InputError, match="pass --resume"):
        run_eval(cfg, out, progress=False)
    run_eval(cfg, out, resume=True, progress=False)
    again = [o for o in read_objects(out / "results.jsonl") if o["kind"] == "result"]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in results)
    before = {r["key"]: r["answer"] for r in results}
    assert all(before[r["key"]] == r["answer"] for r in again)  # greedy: same answers after resume

    with pytest.raises(InputError, match=r"other answer settings.*differing keys: generation"):
        run_eval(small_config(tiny_dir, generation={"max_new_tokens": 5}), out, resume=True, progress=False)


def test_a_run_is_extended_without_redoing_finished_items(tiny_dir, home_with_probe, tmp_path):
    out = tmp_path / "run"
    small = small_config(tiny_dir, limit=1, attacks=["none"], defenses=["none"])
    first = run_eval(small, out, progress=False)
    assert first["run"]["results"] == 2
    before = {o["key"]: o["answer"] for o in read_objects(out / "results.jsonl") if o["kind"] == "result"}
    bigger = small_config(tiny_dir, limit=2, attacks=["none", "prefill"], defenses=["none", "self-reminder"])
    summary = run_eval(bigger, out, resume=True, progress=False)
    assert summary["run"]["results"] == 2 * 2 * 2 + 2 * 2
    session = [o for o in read_objects(out / "results.jsonl") if o["kind"] == "session"][-1]
    assert session["items"] == summary["run"]["results"] - 2  # the two finished items were kept
    after = {o["key"]: o["answer"] for o in read_objects(out / "results.jsonl") if o["kind"] == "result"}
    assert all(after[k] == v for k, v in before.items())
    # narrowing again reports only what the latest session asked for
    assert run_eval(small, out, resume=True, progress=False)["run"]["results"] == 2


def test_report_is_rebuilt_from_results_alone(tiny_dir, home_with_probe, tmp_path):
    out = tmp_path / "run"
    run_eval(small_config(tiny_dir, defenses=["none", "rds"], attacks=["none"]), out, progress=False)
    first = json.loads((out / "summary.json").read_text())
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "results.jsonl").write_bytes((out / "results.jsonl").read_bytes())
    rebuilt = write_outputs(elsewhere / "results.jsonl")
    rebuilt.pop("files")
    assert rebuilt == first
    page = (elsewhere / "report.html").read_text()
    assert "Attack success" in page and "Helpfulness" in page and "Speed" in page
    assert "Data sources" in page and "pyrit==1.1.0" in page and "MIT" in page  # AdvBench, named with its licence
    with pytest.raises(InputError, match="holds no result lines"):
        (tmp_path / "empty.jsonl").write_text("")
        write_outputs(tmp_path / "empty.jsonl")


def test_cli_eval_and_report(tiny_dir, home_with_probe, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {tiny_dir}\njudges: [refusal]\nthreads: 1\ngeneration: {{max_new_tokens: 4}}\n")
    out = tmp_path / "cli-run"
    r = CliRunner().invoke(cli, ["eval", "--config", str(cfg), "--datasets", "advbench,edgy", "--attacks",
                                 "none,gcg-transfer", "--defenses", "none,rds", "--limit", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "attack success" in r.output and "report:" in r.output
    results = [o for o in read_objects(out / "results.jsonl") if o["kind"] == "result"]
    assert len(results) == 1 * 2 * 2 + 1 * 1 * 2
    r = CliRunner().invoke(cli, ["report", str(out / "results.jsonl"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.html").exists()
    r = CliRunner().invoke(cli, ["eval", "--attacks", "none,nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "valid: none" in r.output
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output


# --------------------------------------------------------------------------- summary arithmetic


def _res(defense, attack, harmful, label, refusal=False, dataset="advbench", pid="p1", answer="a", ms=10.0):
    return {"kind": "result", "key": f"{dataset}|{pid}|{attack}|{defense}|0", "dataset": dataset, "prompt_id": pid,
            "harmful": harmful, "prompt": "q", "attack": attack, "defense": defense, "sample": 0, "answer": answer,
            "tokens": 4, "timings": {"ms_per_token": ms, "decode_s": 0.04, "total_s": 0.05},
            "verdicts": {"harm": {"label": label}, "refusal": {"label": refusal}}, "metrics": {"degenerate": False}}


def test_summary_rates_targets_and_intervals():
    lines = [{"kind": "run", "config": {"defenses": ["none", "rds"], "attacks": ["none", "adaptive"],
                                        "judges": ["refusal", "harm"]}}]
    for i in range(10):
        lines.append(_res("none", "none", True, label=True, pid=f"h{i}"))
        lines.append(_res("rds", "none", True, label=i == 0, pid=f"h{i}"))
        lines[-1]["trace"] = {"rollbacks": int(i < 3), "loop_restarts": int(i == 3), "degeneration_stops": 0}
        lines.append(_res("rds", "adaptive", True, label=True, pid=f"h{i}"))
        lines.append(_res("none", "adaptive", True, label=True, pid=f"h{i}"))
    for i in range(4):
        lines.append(_res("none", "none", False, label=False, dataset="mtbench", pid=f"b{i}", answer=f"x{i}", ms=10))
        lines.append(_res("rds", "none", False, label=False, refusal=i == 0, dataset="mtbench", pid=f"b{i}",
                          answer=f"x{i}" if i < 2 else "other", ms=20))
    s = summarize(lines)
    assert s["attack_success"]["rds"]["by_attack"]["none"]["harmful"]["rate"] == 0.1
    assert s["attack_success"]["rds"]["mean_nonadaptive"] == 0.1  # adaptive is reported, not averaged
    cell = s["attack_success"]["rds"]["by_attack"]["none"]
    assert (cell["rolled_back"]["rate"], cell["loop_restarted"]["rate"], cell["loop_cut"]["rate"]) == (0.3, 0.1, 0.0)
    assert cell["caught"]["rate"] == 0.4 and cell["caught_by_finish"] == {"?": 4}
    assert cell["caught_clean_end"]["rate"] == 0.0  # the answers here are "a": no sentence
    assert s["benign"]["rds"]["all"]["identical_to_none"]["rate"] == 0.5
    assert s["benign"]["rds"]["over_refusal_delta"] == 0.25
    assert s["speed"]["rds"]["benign"]["ms_per_token_ratio_vs_none"] == 2.0
    t = s["targets"]
    assert t["best_rds"] == "rds" and t["best_rds_asr"]["met"] and t["undefended_asr"]["met"]
    assert not t["over_refusal_delta"]["met"]
    assert t["adaptive_vs_best_rds"]["rate"] == 1.0
    lo, hi = wilson(1, 10)
    assert 0.0 < lo < 0.1 < hi < 0.5
    assert wilson(0, 0) is None


def test_best_rds_must_keep_benign_answers_usable():
    """A defense that turns everything into gibberish refuses nothing and 'stops' every attack;
    the targets must not crown it."""
    lines = [{"kind": "run", "config": {"defenses": ["none", "rds", "rds-paper"], "attacks": ["none"],
                                        "judges": ["refusal", "harm"]}}]
    for i in range(10):
        lines.append(_res("none", "none", True, label=True, pid=f"h{i}"))
        lines.append(_res("rds", "none", True, label=i < 5, pid=f"h{i}"))
        lines.append(_res("rds-paper", "none", True, label=False, pid=f"h{i}"))
    for i in range(4):
        for d, ppl in (("none", 5.0), ("rds", 6.0), ("rds-paper", 400.0)):
            r = _res(d, "none", False, label=False, dataset="mtbench", pid=f"b{i}", answer=f"x{i}")
            r["metrics"]["ppl_base"] = ppl
            lines.append(r)
    t = summarize(lines)["targets"]
    assert t["best_rds"] == "rds" and t["best_rds_keeps_benign_answers"]
    assert t["benign_perplexity_ratio"] == {"value": 1.2, "target": "<= 2.0", "met": True}
    assert not t["best_rds_asr"]["met"]


def test_resume_refuses_when_a_probe_changed_on_disk(tiny_dir, home_with_probe, tmp_path):
    cfg = small_config(tiny_dir, limit=1, attacks=["none"], defenses=["none", "rds"])
    out = tmp_path / "run"
    run_eval(cfg, out, progress=False)
    folder = home_with_probe / "probes" / paths.model_slug(tiny_dir) / "response"
    g = torch.Generator().manual_seed(6)  # a retrained probe: other weights and threshold
    LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.4,
                meta={"model_id": tiny_dir, "kind": "response"}).save(folder)
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(InputError, match=r"defense '(none|rds)' is not what earlier sessions used"):
        run_eval(cfg, out, resume=True, progress=False)
    assert (out / "results.jsonl").read_bytes() == before  # the refused session wrote nothing


def test_results_with_unicode_line_separators_are_read_whole(tmp_path):
    from rootdefense.jsonl import JsonlWriter, read_objects

    with JsonlWriter(tmp_path / "r.jsonl", append=False) as w:
        for key, text in (("a", "one\u2028two"), ("b", "x\u0085y"), ("c", "plain")):
            w.write({"key": key, "answer": text})
    assert [o["key"] for o in read_objects(tmp_path / "r.jsonl")] == ["a", "b", "c"]


def test_summary_without_a_refusal_judge_and_with_failed_llm_verdicts():
    lines = [{"kind": "run", "config": {"defenses": ["none", "rds"], "attacks": ["none"], "judges": ["llm"]}}]
    for i in range(4):
        for d in ("none", "rds"):
            r = _res(d, "none", True, label=d == "none", pid=f"h{i}")
            r["verdicts"] = {"llm": {"label": d == "none"} if i else {"label": False, "reason": "error: timeout"}}
            lines.append(r)
            b = _res(d, "none", False, label=False, dataset="mtbench", pid=f"b{i}")
            b["verdicts"] = {"llm": {"label": False}}
            lines.append(b)
    s = summarize(lines)
    assert s["primary_judge"] == "llm" and s["judge_failures"] == {"llm": 2}
    cell = s["attack_success"]["none"]["by_attack"]["none"]["harmful"]
    assert (cell["k"], cell["n"]) == (3, 3)  # the failed verdict is left out, not counted as safe
    assert s["benign"]["rds"]["all"]["over_refusal"]["rate"] is None
    assert s["targets"]["checked"] and "over_refusal_delta" not in s["targets"]


def test_judge_apply_rejudges_stored_answers(tiny_dir, home_with_probe, tmp_path):
    cfg = small_config(tiny_dir, limit=1, attacks=["none"], defenses=["none"], judges=["refusal"])
    run_eval(cfg, tmp_path / "a", progress=False)
    lines = read_objects(tmp_path / "a" / "results.jsonl")
    for o in lines:  # drop the stored verdicts, so that apply must recompute them
        if o["kind"] == "result":
            o["verdicts"] = {}
    (tmp_path / "a" / "results.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    (tmp_path / "b").mkdir()
    r = CliRunner().invoke(cli, ["judge", "apply", str(tmp_path / "a" / "results.jsonl"), "--judges", "refusal",
                                 "--out", str(tmp_path / "b" / "results.jsonl")])
    assert r.exit_code == 0, r.output
    again = read_objects(tmp_path / "b" / "results.jsonl")
    assert all("refusal" in o["verdicts"] for o in again if o["kind"] == "result")
    assert (tmp_path / "b" / "report.html").exists()
    # the re-judged file continues as a run with the same settings: nothing left to do
    summary = run_eval(cfg, tmp_path / "b", resume=True, progress=False)
    session = [o for o in read_objects(tmp_path / "b" / "results.jsonl") if o["kind"] == "session"][-1]
    assert session["items"] == 0 and summary["run"]["results"] == 2
    r = CliRunner().invoke(cli, ["judge", "apply", str(tmp_path / "a" / "results.jsonl"), "--judges", "nope",
                                 "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 2 and "valid: refusal" in r.output


def test_rds_expert_endings_are_eval_options():
    from rootdefense.evaluation.defenses import make_defense

    d = make_defense("rds-expert", loop_expert="gated", close=False)
    assert d.options()["loop_expert"] == "gated" and d.options()["close"] is False
    with pytest.raises(InputError, match="loop_expert"):
        make_defense("rds-expert", loop_expert="sometimes")


def test_rds_expert_suspicion_is_an_eval_option():
    from rootdefense.evaluation.defenses import make_defense

    d = make_defense("rds-expert", suspect_nll=9.5, suspect_window=6)
    assert d.correction == {"suspect_nll": 9.5, "suspect_window": 6}
    assert d.options()["suspect_nll"] == 9.5
    with pytest.raises(InputError, match="suspect_nll"):
        make_defense("rds-expert", suspect_nll=-1.0)
