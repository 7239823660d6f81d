"""Train and evaluate harm probes on a model's own hidden states.

Three kinds:
- ``paper``: last prompt token, final layer, PCA to 4 dims + logistic regression (the paper).
- ``query``: last prompt token, layer chosen by a sweep, full-dimension standardised LR.
- ``response``: answer-token positions, where candidates are scored at decode time:
  harmful prompt + complying answer = harmful; harmful prompt + refusal = harmless; benign
  prompt + its answer = harmless.

Layers are chosen by cross-dataset transfer (train without one harmful dataset, test on it),
never by in-distribution accuracy, which flatters probes that learn phrasing. Splits are by
prompt text (see :mod:`rootdefense.data.split`); the benign-but-edgy set is never trained on.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import load_answer_pairs, load_dataset, refusal_for
from ..data.split import alarming_part, edgy_half, part_of, split_of
from ..errors import InputError
from ..stats import auroc, rate, threshold_at_fpr
from .base import KINDS, LinearProbe
from .disguise import FAMILIES, PLAIN, disguised, wrap
from .features import prompt_ids, query_features, response_features, self_answers
from .fit import fit_affine, scores

# manyshot is HarmBench with answers (same prompts): used only as answer pairs
HARMFUL_SETS = ("advbench", "harmbench", "donotanswer", "uncensorbench")
BENIGN_SETS = ("sharegpt", "mtbench", "gsm8k", "imperative", "sensitive", "alarming", "alarming-more")
# benign questions with alarming words: their own answers go to the response probe as well
SENSITIVE = "sensitive"
ALARMING = "alarming"  # split 50/10/40 (data.split.alarming_part): its test part is never fitted
MORE_ALARMING = "alarming-more"  # fit-only companion, 90/10 (data.split.more_alarming_part)
EDGY = "edgy"
REFUSAL_RE = re.compile(r"\b(I can(?:no|')t|I'm sorry|I am sorry|I won't|I will not|As an AI|I'm not able|I apologi[sz]e)",
                        re.IGNORECASE)


@dataclass
class TrainSpec:
    kind: str = "response"
    per_dataset: int = 300  # cap on prompts per dataset (speed); None for all
    layers: list[int] | None = None  # candidate layers for the sweep; default: every 3rd + last
    target_fpr: float | None = None  # benign flag rate the threshold is calibrated to
    self_answers: int = 96  # per side (harmful / benign) for the response probe
    answer_tokens: int = 40
    C: float = 0.05
    seed: int = 0
    # query probe: harmful and benign requests per attack family wrapped in it (0: plain only)
    disguised: int = 100
    # query probe: this many more ShareGPT user turns (ordinary traffic, up to TRAFFIC_TOKENS
    # prompt tokens each) beside the ``per_dataset`` sample; see :func:`traffic_rows`
    traffic: int = 0
    # query probe: this many benign-but-alarming fit requests per attack family wrapped in it
    # (beside ``disguised``; 0: none); see :func:`alarming_disguised`
    alarming_disguised: int = 50
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown probe kind '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.per_dataset is not None and self.per_dataset < 10:
            raise InputError("per_dataset must be at least 10")
        if self.target_fpr is None:
            # per prompt for query probes; per answer for the response probe (an answer
            # counts as flagged when any of its scored tokens is)
            self.target_fpr = 0.05
        if not 0 < self.target_fpr < 0.5:
            raise InputError("target_fpr must lie in (0, 0.5)")
        if self.disguised < 0:
            raise InputError(f"disguised must be >= 0 (requests per family and side), got {self.disguised}")
        if self.traffic < 0:
            raise InputError(f"traffic must be >= 0 (ShareGPT requests), got {self.traffic}")
        if self.alarming_disguised < 0:
            raise InputError(f"alarming_disguised must be >= 0 (requests per family), got {self.alarming_disguised}")


def _sample(examples, n, seed):
    if n is None or len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(list(examples), n)


def _default_layers(num_layers: int) -> list[int]:
    return sorted(set(range(3, num_layers + 1, 3)) | {num_layers})


TRAFFIC = "sharegpt-traffic"
TRAFFIC_TOKENS = 512


def traffic_rows(lm, n: int, seen: set[str], seed: int) -> list[tuple]:
    """``n`` ShareGPT user turns not in ``seen``, of at most TRAFFIC_TOKENS prompt tokens,
    as benign plain rows (source ``sharegpt-traffic``, each in its own split). A query probe
    fitted on 300 of ShareGPT's ~17,000 turns beside short imperative harmful requests reads
    short generic requests ("how can i acquire skills") as harmful; ordinary traffic in
    numbers teaches it otherwise. Long turns are left out for time only."""
    pool = [e for e in load_dataset("sharegpt") if e.prompt not in seen]
    random.Random(seed + 1).shuffle(pool)
    out = []
    for e in pool:
        if len(out) >= n:
            break
        if len(prompt_ids(lm, e.prompt)) <= TRAFFIC_TOKENS:
            out.append((e.prompt, False, TRAFFIC, split_of(e.prompt), PLAIN))
    return out


def alarming_disguised(rows: list[tuple], per_family: int, seed: int) -> list[tuple]:
    """``per_family`` benign-but-alarming requests of the fit part (both alarming sets) in
    each attack family's templates, a different sample per family, each row with its
    family (so leave-one-family-out leaves these out too). The ``disguised`` sample draws
    from every benign set, so few of its wrapped benign requests carry an alarming word,
    while nearly every wrapped harmful one does: a probe then reads "template + alarming
    word" as harm, and refuses "how do I kill weeds" inside a persona."""
    pool = [r for r in rows if r[4] == PLAIN and r[2] in (ALARMING, MORE_ALARMING) and r[3] == "fit"]
    return disguised(pool, per_family, seed + 2)  # all benign: the harmful side draws nothing


def _rows(prompts_by_set: dict[str, list], harmful: bool):
    """(prompt, harmful, source, split, family) rows of plain requests."""
    out = []
    for name, exs in prompts_by_set.items():
        out += [(e.prompt, harmful, name, part_of(e.prompt, name), PLAIN) for e in exs]
    return out


def request_sets(spec: TrainSpec) -> tuple[dict, dict, list]:
    """(harmful sets, benign sets, the edgy eval half) a probe trains on: each set sampled to
    ``per_dataset``, the alarming set whole (split by its own parts: its test part only
    reports; the fit-only second set whole), the edgy set's train half among the benign ones."""
    harm = {n: _sample(load_dataset(n), spec.per_dataset, spec.seed) for n in HARMFUL_SETS}
    benign = {n: load_dataset(n) if n in (ALARMING, MORE_ALARMING)
              else _sample(load_dataset(n), spec.per_dataset, spec.seed) for n in BENIGN_SETS}
    edgy_all = load_dataset(EDGY)
    benign[EDGY] = [e for e in edgy_all if edgy_half(e.prompt) == "train"]
    return harm, benign, [e for e in edgy_all if edgy_half(e.prompt) == "eval"]


def request_rows(lm, spec: TrainSpec, harm: dict, benign: dict) -> list[tuple]:
    """A query or paper probe's (prompt, harmful, source, split, family) rows: the plain
    requests, and for a query probe the disguised ones and ordinary traffic as ``spec`` asks."""
    rows = _rows(harm, True) + _rows(benign, False)
    if spec.kind == "query" and spec.disguised:
        rows += disguised(rows, spec.disguised, spec.seed)
        rows += alarming_disguised(rows, spec.alarming_disguised, spec.seed)  # reads plain rows only
    if spec.kind == "query" and spec.traffic:
        rows += traffic_rows(lm, spec.traffic, {r[0] for r in rows}, spec.seed)
    return rows


def train_probe(lm, spec: TrainSpec, log=print) -> tuple[LinearProbe, dict]:
    t0 = time.time()
    n_layers = lm.num_layers
    harm, benign, edgy = request_sets(spec)
    if spec.kind == "response":
        return _train_response(lm, spec, harm, benign, edgy, t0, log)
    layers = [n_layers] if spec.kind == "paper" else (spec.layers or list(range(1, n_layers + 1)))
    rows = request_rows(lm, spec, harm, benign)
    prompts = [r[0] for r in rows]
    y = np.array([r[1] for r in rows], dtype=int)
    source = np.array([r[2] for r in rows])
    split = np.array([r[3] for r in rows])
    family = np.array([r[4] for r in rows])
    log(f"collecting query states: {len(prompts)} prompts x {len(layers)} layers")
    feats = query_features(lm, prompts, layers).numpy()
    edgy_feats = query_features(lm, [e.prompt for e in edgy], layers).numpy()
    pca = 4 if spec.kind == "paper" else None
    standardize = spec.kind != "paper"
    fit_mask, val_mask, test_mask = split == "fit", split == "val", split == "test"

    sweep, fits = [], []
    for li, layer in enumerate(layers):
        fit, _, res = _evaluate(feats[:, li], y, source, fit_mask, val_mask, test_mask, edgy_feats[:, li], spec,
                                pca, standardize)
        fits.append(fit)
        res["layer"] = layer
        sweep.append(res)
        log(f"  layer {layer:>2}: held-out AUROC {res['test_auroc']:.3f}  cross-dataset TPR "
            f"{res['cross_tpr_mean']:.3f}  edgy FPR {res['edgy_fpr']:.3f}")
    best = max(range(len(layers)), key=lambda i: (sweep[i]["cross_tpr_mean"], sweep[i]["test_auroc"]))
    chosen = sweep[best]
    w, b = fits[best]
    if (family != PLAIN).any():
        chosen["families"] = _leave_one_family_out(feats[:, best], y, family, split, spec, pca, standardize)
        for name, r in chosen["families"].items():
            log(f"  {name:>16}: family unseen: TPR {_pct(r['unseen_tpr'])} FPR {_pct(r['unseen_fpr'])}; "
                f"plain-trained {_pct(r['plain_tpr'])} / {_pct(r['plain_fpr'])}")
    counts = {**{k: len(v) for k, v in harm.items()}, **{k: len(v) for k, v in benign.items()}}
    counts.update({f"disguised:{f}": int((family == f).sum()) for f in FAMILIES if (family == f).any()})
    if (source == TRAFFIC).any():
        counts[TRAFFIC] = int((source == TRAFFIC).sum())
    meta = _meta(lm, spec, "last_prompt_token", layers[best], chosen, sweep, rows=len(prompts),
                 counts=counts, seconds=time.time() - t0)
    probe = LinearProbe(torch.tensor(w, dtype=torch.float32), b, layers[best], chosen["threshold"], meta)
    return probe, meta["metrics"]


def _pct(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _leave_one_family_out(X, y, family, split, spec, pca, standardize) -> dict:
    """Per disguise family, how a probe that never saw it does on it: fitted on the fit
    split of plain requests and every other family, its threshold calibrated on their
    benign validation requests, then measured on the family's requests outside the fit
    split (true and false positive rates). ``plain_*``: the same for a probe fitted on
    plain requests only; ``seen_*``: the probe fitted on every family, for comparison."""
    fit, val, held = split == "fit", split == "val", split != "fit"

    def measure(train_mask, test_mask):
        w, b = fit_affine(X[fit & train_mask], y[fit & train_mask], standardize, pca, spec.C, spec.seed)
        s = scores(X, w, b)
        t = threshold_at_fpr(s[val & train_mask & (y == 0)], spec.target_fpr)
        return rate(s[test_mask & (y == 1)], t), rate(s[test_mask & (y == 0)], t)

    plain = family == PLAIN
    out = {}
    for name in sorted(set(family.tolist()) - {PLAIN}):
        test = held & (family == name)
        unseen = measure(family != name, test)
        only_plain = measure(plain, test)
        seen = measure(np.ones_like(plain), test)
        out[name] = {"unseen_tpr": unseen[0], "unseen_fpr": unseen[1], "plain_tpr": only_plain[0],
                     "plain_fpr": only_plain[1], "seen_tpr": seen[0], "seen_fpr": seen[1],
                     "harmful": int((test & (y == 1)).sum()), "benign": int((test & (y == 0)).sum())}
    return out


def _calibrate(s, benign_val, groups, fpr):
    """Threshold at ``fpr`` of benign validation items: prompts, or (with ``groups``)
    answers, each flagged when any of its scored tokens is."""
    if groups is None:
        return threshold_at_fpr(s[benign_val], fpr)
    best: dict[int, float] = {}
    for g, v in zip(groups[benign_val], s[benign_val]):
        best[int(g)] = max(best.get(int(g), 0.0), float(v))
    return threshold_at_fpr(np.array(list(best.values())), fpr)


def _evaluate(X, y, source, fit_mask, val_mask, test_mask, edgy_X, spec, pca, standardize, groups=None):
    """Fit on the fit split, calibrate on validation, measure. Returns ((w, b), edgy
    scores, metrics); the fit is reused for the final probe rather than refitted."""
    w, b = fit_affine(X[fit_mask], y[fit_mask], standardize, pca, spec.C, spec.seed)
    s = scores(X, w, b)
    t = _calibrate(s, val_mask & (y == 0), groups, spec.target_fpr)
    cross = {}
    for name in sorted(set(source[y == 1].tolist())):
        keep = fit_mask & (source != name)
        w2, b2 = fit_affine(X[keep], y[keep], standardize, pca, spec.C, spec.seed)
        s2 = scores(X, w2, b2)
        t2 = _calibrate(s2, val_mask & (y == 0), groups, spec.target_fpr)
        cross[name] = rate(s2[source == name], t2)
    edgy_s = scores(edgy_X, w, b)
    return (w, b), edgy_s, {
        "test_auroc": auroc(y[test_mask], s[test_mask]),
        "test_tpr": rate(s[test_mask & (y == 1)], t),
        "test_fpr": rate(s[test_mask & (y == 0)], t),
        "test_fpr_by_source": _by_source(s, y, source, test_mask, t, groups),
        "edgy_fpr": rate(edgy_s, t),
        "threshold": t,
        "cross_tpr": cross,
        "cross_tpr_mean": float(np.mean(list(cross.values()))),
    }


def _by_source(s, y, source, test_mask, t, groups):
    """Benign test flag rate per source: per prompt, or (with ``groups``) per answer."""
    out = {}
    for name in sorted(set(source[y == 0].tolist())):
        keep = test_mask & (y == 0) & (source == name)
        if not keep.any():
            continue
        if groups is None:
            out[name] = rate(s[keep], t)
        else:
            owners = set(groups[keep].tolist())
            out[name] = len({int(g) for g, v in zip(groups[keep], s[keep]) if v >= t}) / len(owners)
    return out


def _meta(lm, spec, position, layer, chosen, sweep, rows, counts, seconds):
    return {
        "model_id": lm.model_id,
        "kind": spec.kind,
        "position": position,
        "pipeline": "PCA(4) + logistic regression" if spec.kind == "paper"
        else "standardise + logistic regression (full dimension)",
        "target_fpr": spec.target_fpr,
        "C": spec.C,
        "seed": spec.seed,
        "data": {"harmful": list(HARMFUL_SETS), "benign": list(BENIGN_SETS), "held_out_fpr_set": f"{EDGY} (eval half)", "edgy_train_half": True,
                 "counts": counts, "rows": rows,
                 "disguised_per_family": spec.disguised if spec.kind == "query" else 0,
                 "alarming_disguised_per_family": spec.alarming_disguised if spec.kind == "query" and spec.disguised else 0,
                 "split": "sha256 of normalised prompt: 70% fit / 10% threshold / 20% test"},
        "metrics": {**{k: v for k, v in chosen.items() if k != "threshold"}, "layer": layer},
        "layer_sweep": [{k: r[k] for k in ("layer", "test_auroc", "cross_tpr_mean", "edgy_fpr")} for r in sweep],
        "train_seconds": round(seconds, 1),
        "dtype": str(lm.dtype).replace("torch.", ""),
    }


def _train_response(lm, spec, harm, benign, edgy, t0, log):
    """Answer-position probe. Rows are answer tokens; every split and transfer test is by
    prompt, and cross-dataset transfer leaves out one answer source at a time."""
    layers = spec.layers or _default_layers(lm.num_layers)
    pairs: list[tuple[str, str, int, str, str]] = []  # prompt, answer, label, source, split
    for name in ("uncensorbench", "manyshot"):
        for e in load_answer_pairs(name):
            pairs.append((e.prompt, e.answer, int(e.harmful), name, split_of(e.prompt)))
    for e in _sample(load_answer_pairs("sharegpt"), spec.per_dataset, spec.seed):
        pairs.append((e.prompt, e.answer, 0, "sharegpt", split_of(e.prompt)))
    # the model's own answers: what the probe actually reads at decode time
    pool_h = [e for n in ("advbench", "harmbench", "donotanswer") for e in harm[n] if split_of(e.prompt) != "test"]
    pool_h = _sample(pool_h, spec.self_answers, spec.seed)
    pool_b = [e for n in ("imperative", "mtbench", "gsm8k") for e in benign[n] if split_of(e.prompt) != "test"]
    # every prompt of the edgy training half: edgy words next to benign answers are what
    # a probe trained on generic benign text gets wrong
    pool_b = _sample(pool_b, spec.self_answers, spec.seed) + [e for e in benign[EDGY] if split_of(e.prompt) != "test"]
    pool_s = [e for e in benign.get(SENSITIVE, []) if split_of(e.prompt) != "test"]
    test_h = _sample([e for n in ("advbench", "harmbench") for e in harm[n] if split_of(e.prompt) == "test"],
                     max(spec.self_answers // 3, 16), spec.seed)
    edgy_s = edgy
    test_s = [e for e in benign.get(SENSITIVE, []) if split_of(e.prompt) == "test"]
    # every alarming request (its test part only reports), and its fit part once more inside
    # a persona or fiction frame: a wrapper around a harmless request changes the answer's
    # opening, and a probe that has only seen plain benign answers reads that as harm
    pool_a = list(benign.get(ALARMING, []))
    wrapped_a = [(wrap(("roleplay", "fiction")[i % 2], e.prompt, i // 2), alarming_part(e.prompt))
                 for i, e in enumerate(e for e in pool_a if alarming_part(e.prompt) == "fit")]
    asked = pool_h + pool_b + pool_s + test_h + test_s + edgy_s + pool_a
    log(f"generating the model's own answers to {len(asked) + len(wrapped_a)} prompts ({spec.answer_tokens} tokens)")
    answers = self_answers(lm, [e.prompt for e in asked] + [w for w, _ in wrapped_a],
                           max_new_tokens=spec.answer_tokens)
    own = dict(zip((e.id for e in asked), answers))
    for e in pool_h + test_h:
        a = own[e.id]
        pairs.append((e.prompt, a, 0 if REFUSAL_RE.search(a) else 1, "self-harmful", split_of(e.prompt)))
        pairs.append((e.prompt, refusal_for(e.prompt, e.id), 0, "self-refusal", split_of(e.prompt)))
    for e in pool_b:
        pairs.append((e.prompt, own[e.id], 0, "self-benign", split_of(e.prompt)))
    for e in pool_s + test_s:
        pairs.append((e.prompt, own[e.id], 0, "self-sensitive", split_of(e.prompt)))
    for e in pool_a:
        pairs.append((e.prompt, own[e.id], 0, "self-alarming", alarming_part(e.prompt)))
    for (w, part), a in zip(wrapped_a, answers[len(asked):], strict=True):
        pairs.append((w, a, 0, "self-alarming-disguised", part))
    edgy_pairs = [(e.prompt, own[e.id]) for e in edgy_s]
    pairs = [p for p in pairs if p[1] and p[1].strip()]
    log(f"collecting answer states: {len(pairs)} answers x {len(layers)} layers")
    feats, owner = response_features(lm, [(p[0], p[1]) for p in pairs], layers, spec.answer_tokens)
    edgy_feats, edgy_owner = response_features(lm, edgy_pairs, layers, spec.answer_tokens)
    feats, edgy_feats = feats.numpy(), edgy_feats.numpy()
    owner = owner.numpy()
    y = np.array([pairs[i][2] for i in owner])
    source = np.array([pairs[i][3] if pairs[i][2] == 1 else "benign:" + pairs[i][3] for i in owner])
    split = np.array([pairs[i][4] for i in owner])
    fit_mask, val_mask, test_mask = split == "fit", split == "val", split == "test"
    sweep, fits = [], []
    for li, layer in enumerate(layers):
        fit, es, res = _evaluate(feats[:, li], y, source, fit_mask, val_mask, test_mask, edgy_feats[:, li], spec,
                                 None, True, groups=owner)
        fits.append(fit)
        # answer-level view: share of edgy answers with any token flagged
        flagged = {int(o) for o, s in zip(edgy_owner.numpy(), es) if s >= res["threshold"]}
        res["edgy_answer_flag_rate"] = len(flagged) / max(len(edgy_pairs), 1)
        res["layer"] = layer
        sweep.append(res)
        log(f"  layer {layer:>2}: held-out AUROC {res['test_auroc']:.3f}  cross-source TPR "
            f"{res['cross_tpr_mean']:.3f}  edgy token FPR {res['edgy_fpr']:.3f}  "
            f"edgy answers flagged {res['edgy_answer_flag_rate']:.2f}")
    # chosen by transfer alone: the edgy eval half and the test split only report
    best = max(range(len(layers)), key=lambda i: (sweep[i]["cross_tpr_mean"], sweep[i]["test_auroc"]))
    chosen = sweep[best]
    w, b = fits[best]
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p[3]] = counts.get(p[3], 0) + 1
    meta = _meta(lm, spec, f"answer tokens (first {spec.answer_tokens})", layers[best], chosen, sweep,
                 rows=len(y), counts=counts, seconds=time.time() - t0)
    meta["data"]["answers"] = {"sources": sorted(counts), "self_answer_tokens": spec.answer_tokens}
    meta["metrics"]["edgy_answer_flag_rate"] = chosen["edgy_answer_flag_rate"]
    probe = LinearProbe(torch.tensor(w, dtype=torch.float32), b, layers[best], chosen["threshold"], meta)
    return probe, meta["metrics"]
