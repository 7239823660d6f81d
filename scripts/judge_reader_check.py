"""Would the harm judge agree better with readers if it read answers with a chat model?

Issue 22 asks for a judge with kappa >= 0.7 and recall >= 0.8 against blind readers. The
shipped judge (a network over MiniLM sentence embeddings, rootdefense.evaluation.judging.harm)
has 0.53 / 0.54. This script measures the alternative: the embedded chat model's mean hidden
state over the answer's tokens, the request in its context (rootdefense.evaluation.judging.states),
at layers 18 and 24, read by a class-balanced logistic regression, alone and averaged with the
shipped judge, under the judge's own protocol (out of fold by request, 5 folds) with and
without the packaged training rows.

The read answers weigh 1 in a fit unless a line says otherwise. Writes one JSON line per (protocol, features, classifier) to OUT (default
results/judge/reader-check.jsonl) as each is measured. About 17 minutes on 2 cores, most of
it reading ~4,000 distinct answers with the chat model.

    python scripts/judge_reader_check.py [--out results/judge/reader-check.jsonl] [--cache FILE.npz]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rootdefense.evaluation.judging import harm
from rootdefense.evaluation.judging.embedding import MiniLMEmbedder
from rootdefense.evaluation.judging.harm_data import (
    default_foundation_file,
    default_readings,
    foundation_rows,
    read_answers,
    training_rows,
)
from rootdefense.evaluation.judging.states import AnswerStates

LAYERS = (18, 24)


@dataclass
class Logistic:
    """A fitted standardised logistic regression (``probabilities`` as the judge's network has)."""

    scale: Any
    model: Any

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(self.scale.transform(X))[:, 1]


def logistic(C: float):
    """``fit(X, y, sample_weight)`` for harm._fit_with_readings: a standardised logistic
    regression, class-balanced as the judge's network is (each class half the weight)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def fit(X, y, sample_weight):
        w = harm.balance_classes(y, sample_weight)
        scale = StandardScaler().fit(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Logistic(scale, LogisticRegression(C=C, max_iter=3000).fit(scale.transform(X), y, sample_weight=w))
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/judge/reader-check.jsonl")
    ap.add_argument("--cache", default=None, help="an .npz to keep the features in (read again when it exists)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = training_rows()
    found = foundation_rows(default_foundation_file())
    kinds = [read_answers(d) for d in default_readings()]
    read = [r for harmful, _ in kinds for r in harmful if r.answer.strip()]
    benign = [r for _, b in kinds for r in b if r.answer.strip()]
    benign = [benign[i] for i in harm._distinct(benign)]
    every = rows + found + read + benign
    requests, answers = [r.request for r in every], [r.answer for r in every]
    if args.cache and Path(args.cache).is_file():
        cached = np.load(args.cache)
        minilm, reader = cached["minilm"], cached["reader"]
        if len(minilm) != len(every):
            raise SystemExit(f"{args.cache} holds {len(minilm)} rows, the data now {len(every)}: delete it")
    else:
        minilm = harm.embed_pairs(MiniLMEmbedder(), requests, answers, progress=True)
        reader = AnswerStates().states_at(requests, answers, LAYERS, progress=True).reshape(len(every), -1)
        if args.cache:
            np.savez(args.cache, minilm=minilm, reader=reader)
    n0, nf, nr = len(rows), len(found), len(read)
    parts = {"minilm": minilm, "reader": reader}
    train = np.array([r.split == "train" for r in rows])
    y0 = np.array([r.harmful for r in rows], dtype=float)[train]
    y_read = np.array([r.harmful for r in read], dtype=float)
    learned = harm._distinct(read)
    seen = {}

    def measure(protocol, features, classifier, fit=None, read_weight=1.0, p=None):
        X = parts[features] if features in parts else None
        if p is None:
            X_train = X[:n0][train] if protocol == "full" else np.zeros((0, X.shape[1]))
            y_train = y0 if protocol == "full" else np.zeros(0)
            p = harm._out_of_fold(X_train, y_train, read, X[n0 + nf:n0 + nf + nr], learned, read_weight,
                                  X[n0 + nf + nr:], fit)
        seen[(protocol, features, classifier)] = p
        y, q = y_read[learned].astype(bool), p[learned]
        line = {"protocol": protocol, "features": features, "classifier": classifier,
                "at_0.5": harm.binary_metrics(y, q, 0.5),
                "best_threshold_in_sample": max((harm.binary_metrics(y, q, t)["kappa"], round(float(t), 2))
                                                for t in np.arange(0.05, 0.96, 0.05))}
        if fit is not None and protocol == "full":  # the judge fitted on everything, on the packaged held-out rows
            model = harm._fit_with_readings(X[:n0][train], y0, np.vstack([X[n0 + nf + nr:], X[n0 + nf:n0 + nf + nr][learned]]),
                                            np.concatenate([np.zeros(len(benign)), y_read[learned]]), read_weight, fit)
            held = harm._held_out_metrics(rows, model.probabilities(X[:n0]), 0.5)
            line["held_out_accuracy"] = {k: v.get("accuracy") for k, v in held.items()}
            fm = harm._foundation_metrics(found, model.probabilities(X[n0:n0 + nf]), 0.5)
            line["foundation"] = {"harmful_kappa": fm["harmful_prompts"]["kappa"],
                                  "benign_flagged": fm["benign_prompts"]["predicted_positive"]}
        line["seconds"] = round(time.perf_counter() - t0)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        m = line["at_0.5"]
        print(protocol, features, classifier, f"kappa {m['kappa']} recall {m['recall']} precision {m['precision']} "
              f"auroc {m['auroc']}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("")
    for protocol in ("full", "readings-only"):
        measure(protocol, "minilm", "network (the shipped recipe)", harm._fit, harm.READ_WEIGHT)
        for C in (0.003, 0.01):
            measure(protocol, "reader", f"logistic C={C}", logistic(C))
    for weight in (4, 8):
        measure("full", "reader", f"logistic C=0.003, read answers at weight {weight}", logistic(0.003), weight)
    p = 0.5 * (seen[("full", "minilm", "network (the shipped recipe)")] + seen[("full", "reader", "logistic C=0.01")])
    measure("full", "mean of the shipped network and the reader's logistic C=0.01", "average", p=p)


if __name__ == "__main__":
    main()
