"""Every CLI command through click's runner, on a tiny model saved to a folder (fast) —
the embedded-model commands are in test_integration.py."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    make_tokenizer,
    save_tiny_model,
)

from rootdefense.cli import cli
from rootdefense.probes.base import LinearProbe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tiny_probe(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    g = torch.Generator().manual_seed(3)
    LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                meta={"model_id": tiny_dir, "kind": "response"}).save(d)
    return str(d)


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def test_drafter_help_says_what_the_preset_does():
    """--help lists every drafter name and the tuned preset's real default (auto), not 'none'."""
    from rootdefense.drafting.factory import DRAFTER_NAMES

    for command in ("generate", "chat"):
        text = " ".join(run(command, "--help").output.split())
        assert all(name in text for name in DRAFTER_NAMES) and "[default: none]" not in text
        assert "[default: the preset's: auto for the tuned rds (threshold rule)" in text and "else none]" in text


def test_only_unactionable_warnings_are_silenced():
    """The command line silences transformers' own deprecation warnings, nothing else."""
    import warnings

    from rootdefense.quiet import silence_unactionable_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_unactionable_warnings()
        for category, module in ((FutureWarning, "transformers.modeling_utils"), (FutureWarning, "rootdefense.api"),
                                 (UserWarning, "transformers.generation.utils"), (FutureWarning, "transformersx")):
            warnings.warn_explicit("w", category, "f.py", 1, module=module)
    assert [(w.category, w.filename) for w in seen] == [(FutureWarning, "f.py"), (UserWarning, "f.py"),
                                                        (FutureWarning, "f.py")]


def test_generate_undefended_json(tiny_dir):
    r = run("generate", "How do I bake bread?", "--model", tiny_dir, "--defense", "none",
            "--max-new-tokens", 12, "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert len(rec["token_ids"]) == 12 and rec["trace"]["summary"]["replaced"] == 0
    assert rec["settings"]["defense"] == "none"


def test_generate_rds_with_trace_page(tiny_dir, tiny_probe, tmp_path):
    page = tmp_path / "t.html"
    r = run("generate", "How do I bake bread?", "--model", tiny_dir, "--probe", tiny_probe, "--tau", 0.3,
            "--max-new-tokens", 12, "--json", "--html", page)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    steps = rec["trace"]["steps"]
    assert all(s["harm"] is not None for s in steps)
    assert rec["trace"]["summary"]["replaced"] == sum(s["replaced"] for s in steps) > 0
    html = page.read_text()
    assert html.count('class="tok') >= len(steps) and "model wanted" in html


def test_generate_plain_text_output(tiny_dir, tiny_probe):
    r = run("generate", "hello", "--model", tiny_dir, "--probe", tiny_probe, "--rule", "weighted",
            "--max-new-tokens", 5)
    assert r.exit_code == 0
    assert "tokens replaced" in r.output


def test_batch_keeps_fields_and_resumes(tiny_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n\n"
                   + json.dumps({"id": "b", "messages": [{"role": "user", "content": "bread?"}]}) + "\n")
    args = ["generate", "--model", tiny_dir, "--defense", "none", "--max-new-tokens", 4,
            "--input", inp, "--output", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["id"], x["line"]) for x in lines] == [("a", 1), ("b", 3)]
    assert all("text" in x and "trace" in x and "timings" in x for x in lines)
    assert lines[1]["messages"][0]["content"] == "bread?"
    r = run(*args)  # refuses to clobber
    assert r.exit_code == 2 and "--resume" in r.output
    with inp.open("a") as fh:
        fh.write(json.dumps({"id": "c", "prompt": "more"}) + "\n")
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "1 answers written" in r.output and "2 already done" in r.output
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]


@pytest.mark.parametrize("bad,needle", [
    (b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": oops}\n', "line 3 is not valid JSON"),
    (b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": "\xff\xfe"}\n', "line 3 is not valid UTF-8"),
    (b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"text": "no prompt"}\n', "line 3 has neither"),
    (b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": "   "}\n', "line 3: empty prompt"),
])
def test_batch_bad_line_keeps_finished_lines(tiny_dir, tmp_path, bad, needle):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(bad)
    r = run("generate", "--model", tiny_dir, "--defense", "none", "--max-new-tokens", 3,
            "--input", inp, "--output", out)
    assert r.exit_code == 2
    assert needle in r.output
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("args,needle", [
    (["generate", "  "], "empty prompt"),
    (["generate", "hi", "--max-new-tokens", -3], "max_new_tokens"),
    (["generate", "hi", "--max-new-tokens", 10**9], "max_new_tokens"),
    (["generate", "hi", "--temperature", -1], "temperature"),
    (["generate", "hi", "--top-m", 0], "top_m"),
    (["generate", "hi", "--tau", 1.5], "tau"),
    (["generate", "hi", "--top-p", 2], "top_p"),
    (["generate", "hi", "--candidate-top-p", 0], "candidate_top_p"),
    (["generate"], "give a PROMPT"),
    (["generate", "hi", "--drafter", "eagle"], "unknown drafter 'eagle'"),
    (["generate", "hi", "--drafter", "ngram", "--rule", "paper"], "needs the threshold rule"),
    (["generate", "hi", "--drafter", "ngram", "--max-draft", 0], "max_draft"),
    (["generate", "hi", "--input", "x.jsonl"], "not both"),
])
def test_bad_arguments_exit_2(tiny_dir, tiny_probe, args, needle):
    r = run(*args, "--model", tiny_dir, "--probe", tiny_probe)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_unknown_model_is_named(rd_home):
    r = run("generate", "hi", "--model", "./no/such/model", "--defense", "none")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_prompt_longer_than_context(tiny_dir):
    r = run("generate", "bread " * 600, "--model", tiny_dir, "--defense", "none", "--max-new-tokens", 4)
    assert r.exit_code == 2 and "context window" in r.output


def test_probe_for_another_model_is_refused(tiny_dir, tmp_path):
    LinearProbe(torch.zeros(48), 0.0, 1, 0.5, {"model_id": "someone/else"}).save(tmp_path / "p")
    r = run("generate", "hi", "--model", tiny_dir, "--probe", tmp_path / "p")
    assert r.exit_code == 2 and "trained for model 'someone/else'" in r.output
    LinearProbe(torch.zeros(64), 0.0, 1, 0.5, {"model_id": tiny_dir}).save(tmp_path / "q")
    r = run("generate", "hi", "--model", tiny_dir, "--probe", tmp_path / "q")
    assert r.exit_code == 2 and "hidden size 64" in r.output


def test_corrupt_probe_is_refused(tiny_dir, tiny_probe, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_probe, bad)
    (bad / "probe.safetensors").write_bytes(b"not a safetensors file")
    r = run("generate", "hi", "--model", tiny_dir, "--probe", bad)
    assert r.exit_code == 2 and "corrupt" in r.output
    shutil.copytree(tiny_probe, tmp_path / "bad2")
    (tmp_path / "bad2" / "probe.json").write_text("{nope")
    r = run("generate", "hi", "--model", tiny_dir, "--probe", tmp_path / "bad2")
    assert r.exit_code == 2 and "corrupt" in r.output
    r = run("generate", "hi", "--model", tiny_dir, "--probe", tmp_path / "missing")
    assert r.exit_code == 2 and "no probe" in r.output


def test_missing_default_probe_names_the_command(tiny_dir, rd_home):
    r = run("generate", "hi", "--model", tiny_dir)
    assert r.exit_code == 2 and "rootdefense probe train" in r.output


def test_chat_keeps_history(tiny_dir, tiny_probe):
    r = run("chat", "--model", tiny_dir, "--probe", tiny_probe, "--max-new-tokens", 4,
            input="hello\n\nhow are you?\n/reset\nbye\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("bot> ") == 3


def test_probe_eval_rejects_another_models_probe(tiny_dir, tmp_path):
    LinearProbe(torch.zeros(48), 0.0, 1, 0.5, {"model_id": "someone/else"}).save(tmp_path / "p")
    r = run("probe", "eval", tmp_path / "p", "--model", tiny_dir)
    assert r.exit_code == 2 and "someone/else" in r.output


def test_probe_train_rejects_bad_options(tiny_dir):
    r = run("probe", "train", "--model", tiny_dir, "--layers", "a,b")
    assert r.exit_code == 2 and "--layers" in r.output
    r = run("probe", "train", "--model", tiny_dir, "--per-dataset", 2)
    assert r.exit_code == 2 and "per_dataset" in r.output
    r = run("probe", "train", "--model", tiny_dir, "--traffic", -1)
    assert r.exit_code == 2 and "--traffic" in r.output
    r = run("probe", "train", "--model", tiny_dir, "--alarming-disguised", -1)
    assert r.exit_code == 2 and "--alarming-disguised" in r.output


def test_data_list_and_export():
    r = run("data", "list")
    assert r.exit_code == 0 and "advbench" in r.output and "MIT" in r.output
    r = run("data", "export", "advbench", "mtbench", "--split", "test", "--limit", 3)
    assert r.exit_code == 0
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 6 and rows[0]["harmful"] and not rows[-1]["harmful"]
    from rootdefense.data.split import split_of

    assert all(split_of(x["prompt"]) == "test" for x in rows)
    r = run("data", "export", "nope")
    assert r.exit_code == 2 and "valid names" in r.output


def test_expert_train_command(tiny_dir, tmp_path):
    out = tmp_path / "expert"
    r = run("expert", "train", "--model", tiny_dir, "--harmful", 8, "--benign", 8, "--epochs", 1,
            "--rank", 2, "--answer-tokens", 6, "--disguised", 2, "--families", "prefix-injection", "--alarming", 2,
            "--no-check", "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "expert.json").read_text())
    assert meta["model_id"] == tiny_dir and meta["spec"]["families"] == ["prefix-injection"]
    assert sum(n for k, n in meta["data"]["counts"].items() if k.startswith("refuse:prefix-injection:")) == 2
    r = run("expert", "train", "--model", tiny_dir, "--harmful", 1)
    assert r.exit_code == 2 and "at least 8" in r.output
    r = run("expert", "train", "--model", tiny_dir, "--families", "roleplay,gibberish")
    assert r.exit_code == 2 and "unknown wrapper family gibberish" in r.output


def test_generate_rds_expert_streams_with_rollback_info(tiny_dir, tiny_probe, rd_home):
    from test_defenses import write_expert

    from rootdefense.paths import expert_dir

    tok = make_tokenizer()
    write_expert(tok, expert_dir(tiny_dir), model_id=tiny_dir)
    r = run("generate", "How do I bake bread?", "--model", tiny_dir, "--defense", "rds-expert", "--probe",
            tiny_probe, "--tau", "0.000001", "--max-new-tokens", 6, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["settings"]["defense"] == "rds-expert" and out["settings"]["rollback"] == "answer"
    assert out["trace"]["summary"]["rollbacks"] == 1 and out["trace"]["events"][0]["reason"] == "harm"
    # an expert equal to the base model corrects nothing: the steered answer is withheld, the status line says so
    same = write_expert(tok, rd_home / "same-expert", zero=True, model_id=tiny_dir)
    args = ("generate", "How do I bake bread?", "--model", tiny_dir, "--defense", "rds-expert", "--probe", tiny_probe,
            "--expert", str(same), "--tau", "0.000001", "--max-new-tokens", 6)
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["finish_reason"] == "withheld" and out["text"] == "" and out["trace"]["summary"]["withheld"]
    assert out["trace"]["events"][-1]["type"] == "withhold" and out["trace"]["events"][-1]["lift"] == 0.0
    r = run(*args)
    assert r.exit_code == 0 and "withheld: the expert's correction never came" in r.output, r.output
    r = run("generate", "hi", "--model", tiny_dir, "--defense", "rds-expert", "--probe", tiny_probe,
            "--expert", str(rd_home / "nowhere"))
    assert r.exit_code == 2 and "no expert adapter" in r.output


@pytest.mark.parametrize("defense", ["none", "rds", "rds-expert"])
def test_generate_with_a_drafter_equals_without(tiny_dir, tiny_probe, tmp_path, defense):
    """--drafter ngram / model:SAME verify drafts in one forward and change no token (greedy)."""
    from test_defenses import write_expert

    extra = ["--expert", str(write_expert(make_tokenizer(), tmp_path / "expert", model_id=tiny_dir))] \
        if defense == "rds-expert" else []
    base = ["generate", "Sure, here is a tutorial: step one, step two", "--model", tiny_dir, "--probe", tiny_probe,
            "--defense", defense, "--tau", 0.999 if defense == "rds-expert" else 0.45, "--max-new-tokens", 24, "--json", *extra]
    plain = json.loads(run(*base).stdout)
    for drafter in ("ngram", f"model:{tiny_dir}"):
        rec = json.loads(run(*base, "--drafter", drafter).stdout)
        assert rec["token_ids"] == plain["token_ids"], drafter
        assert rec["settings"]["drafter"] in ("prompt-lookup", "draft-model")
        t = rec["timings"]
        assert t["drafted"] > 0 or (defense == "rds" and t["exact_steps"] == len(rec["token_ids"])), t


@pytest.mark.parametrize("defense", ["none", "rds"])
def test_batch_size_changes_no_answer(tiny_dir, tiny_probe, tmp_path, defense):
    inp = tmp_path / "in.jsonl"
    prompts = ["hi", "How do I bake bread?", "Sure, here is a tutorial", "bread?", "step one"]
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    texts = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}.jsonl"
        r = run("generate", "--model", tiny_dir, "--probe", tiny_probe, "--defense", defense, "--tau", 0.45,
                "--max-new-tokens", 10, "--input", inp, "--output", out, "--batch-size", size)
        assert r.exit_code == 0, r.output
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x["line"] for x in lines] == [1, 2, 3, 4, 5]
        texts[size] = [(x["text"], x["trace"]["summary"]["replaced"]) for x in lines]
        if size == 3:
            assert lines[0]["timings"]["batch_size"] == 3 and lines[3]["timings"]["batch_size"] == 2
    assert texts[1] == texts[3]
    r = run("generate", "--model", tiny_dir, "--input", inp, "--output", tmp_path / "x.jsonl", "--batch-size", 0)
    assert r.exit_code == 2 and "batch size" in r.output


def test_cli_judge_train_passes_its_options_when_no_judge_is_cached(monkeypatch, tmp_path):
    """Without --force the judge trains only when none is cached, and then with the options
    given (they were once ignored there); a weight of 0 is refused by the option itself."""
    from rootdefense.evaluation.judging import harm as harm_mod

    monkeypatch.setenv("ROOTDEFENSE_HOME", str(tmp_path / "home"))
    seen = {}

    class Trained(Exception):
        pass

    def fake_train(out_dir=None, progress=True, **options):
        seen.update(options)
        raise Trained

    monkeypatch.setattr(harm_mod, "train_harm_judge", fake_train)
    with pytest.raises(Trained):
        run("judge", "train", "--no-learn-readings", "--read-weight", "0.5")
    assert seen == {"learn_readings": False, "read_weight": 0.5}
    r = CliRunner().invoke(cli, ["judge", "train", "--read-weight", "0"])
    assert r.exit_code == 2 and "--read-weight" in r.output
