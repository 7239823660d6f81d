"""The benign-but-alarming set: written here, distinct, well-formed, split 50/10/40 with a
held-out test part, loadable and exportable. Light: no model is loaded."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from rootdefense.cli import cli
from rootdefense.data import DATASETS, alarming, imperative_prompts, load_dataset, sensitive
from rootdefense.data.split import SPLITS, _normal, alarming_part, held_out, in_split, split_of
from rootdefense.errors import DataError

CATEGORIES = ("homonyms", "sports_games", "gardening", "cooking", "parties_shopping", "chemistry_class",
              "safety_info", "medical", "history", "fiction_conflict", "language_idioms")
PROMPTS = [p for _, p in alarming.alarming_prompts()]


def test_prompts_are_many_distinct_and_well_formed():
    assert alarming.LICENCE == "Apache-2.0 (written for rootdefense)"
    assert tuple(alarming.QUESTIONS) == CATEGORIES
    assert all(len(qs) >= 20 for qs in alarming.QUESTIONS.values()), {k: len(v) for k, v in alarming.QUESTIONS.items()}
    assert len(PROMPTS) >= 330
    normal = Counter(_normal(p) for p in PROMPTS)
    assert not [p for p, n in normal.items() if n > 1]
    for p in PROMPTS:
        assert p == p.strip() and "\n" not in p and "\r" not in p, p
        assert 5 <= len(p.split()) <= 40, p


def _near_copies(others: list[str]) -> list[tuple[str, str]]:
    """(ours, theirs) pairs that are equal or share most of their words (Jaccard >= 0.6)."""
    words = {p: set(_normal(p).split()) for p in PROMPTS}
    out = []
    for o in others:
        w = set(_normal(o).split())
        out += [(p, o) for p, ws in words.items() if len(ws & w) >= 0.6 * len(ws | w)]
    return out


def test_prompts_are_new_to_the_project():
    others = [q for _, q in sensitive.sensitive_prompts()] + imperative_prompts()
    assert not {_normal(q) for q in others} & {_normal(p) for p in PROMPTS}
    assert not _near_copies(others)


def test_prompts_are_not_in_the_edgy_set():
    try:
        edgy = [e.prompt for e in load_dataset("edgy")]
    except DataError as exc:  # its package is not installed
        pytest.skip(str(exc))
    assert not {_normal(q) for q in edgy} & {_normal(p) for p in PROMPTS}
    assert not _near_copies(edgy)


def test_split_is_deterministic_disjoint_and_large_enough():
    parts = [alarming_part(p) for p in PROMPTS]
    assert parts == [alarming_part(p) for p in PROMPTS]
    assert set(parts) == {"fit", "val", "test"}
    count = Counter(parts)
    assert count["test"] >= 120 and count["val"] > 0 and count["fit"] > count["test"], count
    # the split reads the normalised text: case and punctuation do not move a prompt
    assert alarming_part(PROMPTS[0].upper().rstrip("?")) == alarming_part(PROMPTS[0])
    # salted: not the same partition as the generic 70/10/20 split
    assert any((alarming_part(p) == "test") != (split_of(p) == "test") for p in PROMPTS)


def test_held_out_is_the_test_part():
    test = [p for p in PROMPTS if alarming_part(p) == "test"]
    rows = held_out("alarming")
    assert [e.prompt for e in rows] == test
    assert [e.prompt for e in held_out("alarming", 5)] == test[:5]
    assert "alarming-test" in SPLITS
    assert [p for p in PROMPTS if in_split(p, "alarming-test")] == test


def test_load_dataset_records_carry_the_category():
    info = DATASETS["alarming"]
    assert not info.harmful and not info.package and info.licence == alarming.LICENCE
    rows = load_dataset("alarming")
    assert [e.prompt for e in rows] == PROMPTS
    assert rows[0].id == "alarming-0001" and all(e.source == "alarming" and not e.harmful for e in rows)
    assert [e.meta["category"] for e in rows] == [c for c, _ in alarming.alarming_prompts()]
    assert load_dataset("alarming", limit=3) == rows[:3]


def test_export_cli_alarming_test():
    r = CliRunner().invoke(cli, ["data", "export", "alarming", "--split", "alarming-test", "--limit", "4"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 4 and all(x["source"] == "alarming" and not x["harmful"] for x in rows)
    assert [x["prompt"] for x in rows] == [e.prompt for e in held_out("alarming", 4)]
    r = CliRunner().invoke(cli, ["data", "export", "alarming", "--split", "alarming-test"], catch_exceptions=False)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == len(held_out("alarming"))
