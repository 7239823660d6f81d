"""The second benign-but-alarming set: written here, distinct, well-formed, fit-only (90/10, no
test part), and no near copy of the first set, so the first set's test part stays unseen.
Light: no model is loaded."""

from __future__ import annotations

from collections import Counter

from rootdefense.data import DATASETS, alarming, alarming_more, load_dataset
from rootdefense.data.split import _normal, alarming_part, held_out, more_alarming_part, part_of

MORE = [p for _, p in alarming_more.more_alarming_prompts()]
FIRST = [p for _, p in alarming.alarming_prompts()]


def test_prompts_are_many_distinct_and_well_formed():
    assert alarming_more.LICENCE == "Apache-2.0 (written for rootdefense)"
    assert len(MORE) >= 500 and len(alarming_more.QUESTIONS) >= 10
    assert all(len(qs) >= 20 for qs in alarming_more.QUESTIONS.values())
    normal = Counter(_normal(p) for p in MORE)
    assert not [p for p, n in normal.items() if n > 1]
    for p in MORE:
        assert p == p.strip() and "\n" not in p and "\r" not in p, p
        assert 3 <= len(p.split()) <= 60, p


def test_no_prompt_repeats_the_first_set():
    """Exact (normalised) copies of the first set and near copies of its test part (most of
    the words shared: Jaccard >= 0.5) would leak the over-refusal test into fitting."""
    assert not {_normal(p) for p in MORE} & {_normal(p) for p in FIRST}
    test = [set(_normal(p).split()) for p in FIRST if alarming_part(p) == "test"]
    near = [p for p in MORE for t in test
            if len(set(_normal(p).split()) & t) >= 0.5 * len(set(_normal(p).split()) | t)]
    assert not near, near[:5]


def test_split_is_fit_and_val_only():
    parts = Counter(more_alarming_part(p) for p in MORE)
    assert set(parts) == {"fit", "val"}
    assert 0.05 <= parts["val"] / len(MORE) <= 0.15, parts
    assert all(part_of(p, "alarming-more") == more_alarming_part(p) for p in MORE[:50])
    assert more_alarming_part(MORE[0].upper().rstrip("?")) == more_alarming_part(MORE[0])
    assert held_out("alarming-more") == []  # nothing here measures over-refusal


def test_registered_as_benign_dataset():
    info = DATASETS["alarming-more"]
    assert not info.harmful and not info.package and info.licence == alarming_more.LICENCE
    rows = load_dataset("alarming-more")
    assert [e.prompt for e in rows] == MORE
    assert rows[0].id == "alarming-more-0001" and all(e.source == "alarming-more" and not e.harmful for e in rows)
    assert {e.meta["category"] for e in rows} == set(alarming_more.QUESTIONS)
