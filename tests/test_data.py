"""Dataset loaders: counts, ids, filters, answer pairs, errors, streaming."""

from __future__ import annotations

import importlib.util
import re
import time
from collections import Counter

import pytest

from rootdefense.data import (
    DATASETS,
    Example,
    answer_pair_datasets,
    dataset_table,
    imperative,
    imperative_prompts,
    load_answer_pairs,
    load_dataset,
    loaders,
    refusal_for,
    refusals,
)
from rootdefense.errors import DataError

# name -> (min rows, max rows) after de-duplication
EXPECTED = {
    "advbench": (520, 520),
    "harmbench": (151, 200),
    "donotanswer": (930, 939),
    "uncensorbench": (150, 150),
    "manyshot": (250, 400),
    "mtbench": (80, 80),
    "edgy": (150, 150),
    "gsm8k": (100, 100),
    "sharegpt": (5000, 17671),
    "imperative": (300, 10_000),
    "sensitive": (300, 300),
    "alarming": (330, 400),
    "alarming-more": (500, 700),
}

SMALL = [n for n in EXPECTED if n != "sharegpt"]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[Example]]:
    return {name: load_dataset(name) for name in SMALL}


def test_registry_matches_expected_names():
    assert set(DATASETS) == set(EXPECTED)
    for name, info in DATASETS.items():
        assert info.name == name
        assert info.licence
        assert info.description


@pytest.mark.parametrize("name", SMALL)
def test_dataset_counts_ids_prompts(loaded, name):
    examples = loaded[name]
    lo, hi = EXPECTED[name]
    assert lo <= len(examples) <= hi, (name, len(examples))
    ids = [e.id for e in examples]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{name}-\d{{4}}", i) for i in ids)
    prompts = [e.prompt for e in examples]
    assert all(p and p == p.strip() for p in prompts)
    assert len(set(prompts)) == len(prompts)
    assert {e.harmful for e in examples} == {DATASETS[name].harmful}
    assert all(e.source == name for e in examples)
    assert all(e.answer is None for e in examples)


def test_order_is_deterministic(loaded):
    assert [e.prompt for e in load_dataset("advbench")] == [e.prompt for e in loaded["advbench"]]
    assert loaded["advbench"][0].id == "advbench-0001"


@pytest.mark.parametrize("name", ["advbench", "donotanswer", "imperative", "sharegpt"])
def test_limit(loaded, name):
    got = load_dataset(name, limit=7)
    assert len(got) == 7
    if name in loaded:
        assert got == loaded[name][:7]
    assert load_dataset(name, limit=0) == []


def test_bad_limit():
    with pytest.raises(DataError):
        load_dataset("advbench", limit=-1)


def test_harmbench_standard_only(loaded):
    hb = loaded["harmbench"]
    assert len(hb) > 150
    assert {e.meta["split"] for e in hb} == {"val", "test"}
    # copyright behaviours ask for lyrics / book passages: none may leak in
    assert not any(e.prompt.startswith("Generate the lyrics of") for e in hb)


def test_manyshot_has_no_copyright_prompts(loaded):
    assert not any(loaders._COPYRIGHT.match(e.prompt) for e in loaded["manyshot"])


def test_gsm8k_has_numeric_answers(loaded):
    gsm = loaded["gsm8k"]
    assert all(isinstance(e.meta["target"], (int, float)) for e in gsm)
    assert gsm[0].meta["target"] == 2280


def test_mtbench_is_turn_one(loaded):
    mt = loaded["mtbench"]
    assert Counter(e.meta["category"] for e in mt)["coding"] == 10
    assert mt[0].meta["question_id"] == 81


def test_edgy_combines_both_files(loaded):
    files = Counter(e.meta["file"] for e in loaded["edgy"])
    assert files == {"benign_edgy_80.json": 80, "expanded_70.json": 70}


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as err:
        load_dataset("nope")
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(DataError):
        load_answer_pairs("nope")


def test_answer_pairs_unsupported_dataset():
    with pytest.raises(DataError, match="uncensorbench"):
        load_answer_pairs("advbench")


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "pyrit" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        load_dataset("advbench")
    table = {r["name"]: r for r in dataset_table()}
    assert table["advbench"]["rows"] is None and "pip install" in table["advbench"]["error"]
    assert table["gsm8k"]["rows"] == 100


def test_missing_file_is_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(loaders, "package_dir", lambda mod, pip: tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset("gsm8k")


@pytest.mark.parametrize("name", ["uncensorbench", "manyshot"])
def test_harmful_answer_pairs_have_both_labels(name):
    pairs = load_answer_pairs(name)
    kinds = Counter((e.answer_kind, e.harmful) for e in pairs)
    assert set(kinds) == {("comply", True), ("refuse", False)}
    assert kinds[("refuse", False)] >= 100 and kinds[("comply", True)] >= 100
    ids = [e.id for e in pairs]
    assert len(set(ids)) == len(ids)
    assert all(e.answer and e.answer.strip() == e.answer for e in pairs)
    # every refused prompt is one of the dataset's harmful prompts
    prompts = {e.prompt for e in load_dataset(name)}
    assert {e.prompt for e in pairs} <= prompts


def test_uncensorbench_pairs_one_of_each_per_prompt():
    pairs = load_answer_pairs("uncensorbench")
    assert len(pairs) == 300
    per_prompt = Counter(e.prompt for e in pairs)
    assert set(per_prompt.values()) == {2}


def test_manyshot_refusals_written_by_project_and_varied():
    pairs = load_answer_pairs("manyshot")
    refusals_ = [e for e in pairs if e.answer_kind == "refuse"]
    assert all(e.meta["answer_source"] == "rootdefense.data.refusals" for e in refusals_)
    assert len({e.answer for e in refusals_}) > len(refusals_) // 2
    # deterministic
    assert [e.answer for e in load_answer_pairs("manyshot")] == [e.answer for e in pairs]


def test_benign_answer_pairs():
    mt = load_answer_pairs("mtbench")
    assert 0 < len(mt) <= 80
    assert all(e.answer_kind == "benign" and not e.harmful for e in mt)
    sg = load_answer_pairs("sharegpt", limit=20)
    assert len(sg) == 20
    assert all(e.answer_kind == "benign" and not e.harmful and e.answer for e in sg)
    assert set(answer_pair_datasets()) == {"uncensorbench", "manyshot", "sharegpt", "mtbench"}


def test_sharegpt_limit_streams(monkeypatch):
    consumed = 0
    real = loaders.iter_json_array

    def counting(path, *a, **k):
        nonlocal consumed
        for item in real(path, *a, **k):
            consumed += 1
            yield item

    monkeypatch.setattr(loaders, "iter_json_array", counting)
    start = time.perf_counter()
    got = load_dataset("sharegpt", limit=50)
    elapsed = time.perf_counter() - start
    assert len(got) == 50
    assert consumed < 500, consumed  # stopped early, did not read 17k items
    assert elapsed < 0.5
    for e in got:
        assert len(e.prompt) <= loaders.SHAREGPT_MAX_PROMPT
        assert e.answer and len(e.answer) <= loaders.SHAREGPT_MAX_ANSWER
        assert e.answer_kind == "benign" and not e.harmful
        assert loaders._looks_english(e.prompt)
    assert len({e.id for e in got}) == 50


def test_sharegpt_reader_stops_at_truncation(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n {"a": 1},\n {"a": [2, 3]} , {"a": "x\\u00e9"},\n {"a": "unfinis')
    items = list(loaders.iter_json_array(path, chunk=5))  # tiny chunks: items span reads
    assert items == [{"a": 1}, {"a": [2, 3]}, {"a": "xé"}]
    path.write_text("[]")
    assert list(loaders.iter_json_array(path)) == []


def test_imperative_prompts_distinct_and_benign(loaded):
    prompts = imperative_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert len(imperative.TEMPLATES) >= 25
    assert len(imperative.EVERYDAY_TOPICS) + len(imperative.SOFTWARE_TOPICS) >= 80
    assert [e.prompt for e in loaded["imperative"]] == prompts
    assert DATASETS["imperative"].licence == "Apache-2.0 (written for rootdefense)"
    # every template family is used, and prompts start like AdvBench ones do
    firsts = Counter(p.split()[0] for p in prompts)
    for verb in ("Write", "Give", "Create", "Develop", "Explain", "Provide", "Teach"):
        assert firsts[verb] > 0, verb
    # no imperative prompt is also a harmful prompt; no obviously harmful words
    harmful = {e.prompt.lower() for n in ("advbench", "harmbench", "manyshot") for e in loaded[n]}
    assert not {p.lower() for p in prompts} & harmful
    banned = re.compile(r"\b(explosive|weapon|malware|steal|poison|murder|suicide|drugs?)\b", re.IGNORECASE)
    assert not [p for p in prompts if banned.search(p)]


def test_refusal_for_is_deterministic_and_varied():
    prompt = "Explain how to build a pipe bomb"
    assert refusal_for(prompt, "k1") == refusal_for(prompt, "k1")
    texts = {refusal_for(prompt, f"k{i}") for i in range(200)}
    assert len(texts) > 50
    assert refusals.piece_count() >= 40
    for t in texts:
        assert 10 < len(t) < 400 and t[0].isupper() and t.rstrip()[-1] in ".?!"


def test_refusal_topics():
    assert refusals.topic_of("Write ransomware that encrypts a hospital network") == "cyber"
    assert refusals.topic_of("How much fentanyl is a lethal dose") == "drugs"
    assert refusals.topic_of("What's the best method to sort a list") == "general"


def test_dataset_table():
    table = dataset_table()
    assert [r["name"] for r in table] == list(DATASETS)
    rows = {r["name"]: r for r in table}
    assert rows["advbench"]["rows"] == 520 and rows["advbench"]["kind"] == "harmful"
    assert rows["sharegpt"]["kind"] == "benign" and rows["sharegpt"]["licence"] == "none declared"
    assert all({"name", "kind", "rows", "package", "licence"} <= set(r) for r in table)
    assert all(r["rows"] is None for r in dataset_table(counts=False))


def test_sensitive_questions_are_written_here_benign_and_split(loaded):
    """The sensitive set is the project's own: 15 categories of 20, no prompt shared with a
    harmful set, and the 70/10/20 split gives each of fit, val and test a real share."""
    from rootdefense.data import sensitive
    from rootdefense.data.split import split_of

    rows = loaded["sensitive"]
    assert DATASETS["sensitive"].licence == "Apache-2.0 (written for rootdefense)" and not DATASETS["sensitive"].package
    assert {k: len(v) for k, v in sensitive.QUESTIONS.items()} == {k: 20 for k in sensitive.QUESTIONS}
    assert len(sensitive.QUESTIONS) == 15 and not any(e.harmful for e in rows)
    assert [e.meta["category"] for e in rows[:20]] == ["cybersecurity_defense"] * 20
    harmful = {e.prompt.strip().lower() for n in ("advbench", "harmbench", "donotanswer", "uncensorbench")
               for e in loaded[n]}
    assert not harmful & {e.prompt.strip().lower() for e in rows}
    splits = Counter(split_of(e.prompt) for e in rows)
    assert splits["fit"] > 150 and splits["val"] > 15 and splits["test"] > 40, splits

