"""Re-score a saved probe on data it never saw: the test split by prompt text and the eval
half of the benign-but-edgy set. Cross-dataset transfer needs refits, so it is reported from
the probe's training record."""

from __future__ import annotations

import numpy as np

from ..data import load_answer_pairs
from ..data.split import held_out, split_of
from ..stats import auroc, rate
from .features import query_features, response_features, self_answers
from .train import BENIGN_SETS, EDGY, HARMFUL_SETS


def evaluate_probe(lm, probe, limit: int | None = None) -> dict:
    kind = probe.meta.get("kind", "query")
    t = probe.threshold
    report = {"kind": kind, "layer": probe.layer, "threshold": t, "model_id": probe.model_id}
    edgy = held_out(EDGY, limit)

    def score(feats):
        return probe.score(feats[:, 0]).numpy()

    if kind in ("paper", "query"):
        harm = {n: held_out(n, limit) for n in HARMFUL_SETS}
        # a fit-only set (alarming-more) has no held-out part to score
        ben = {n: exs for n in BENIGN_SETS if (exs := held_out(n, limit))}
        hs = {n: score(query_features(lm, [e.prompt for e in exs], [probe.layer])) for n, exs in harm.items()}
        bss = {n: score(query_features(lm, [e.prompt for e in exs], [probe.layer])) for n, exs in ben.items()}
        bs = np.concatenate(list(bss.values()))
        es = score(query_features(lm, [e.prompt for e in edgy], [probe.layer]))
        allh = np.concatenate(list(hs.values()))
        report.update({
            "unit": "prompt",
            "held_out_auroc": auroc(np.r_[np.ones(len(allh)), np.zeros(len(bs))], np.r_[allh, bs]),
            "tpr": {n: rate(s, t) for n, s in hs.items()},
            "benign_fpr": rate(bs, t),
            "benign_fpr_by_set": {n: rate(v, t) for n, v in bss.items()},
            "edgy_fpr": rate(es, t),
            "counts": {**{n: len(s) for n, s in hs.items()}, "benign": len(bs), "edgy": len(es)},
        })
    else:
        pairs = []
        for name in ("uncensorbench", "manyshot", "sharegpt"):
            exs = [e for e in load_answer_pairs(name) if split_of(e.prompt) == "test"]
            pairs += [(e.prompt, e.answer, int(e.harmful), name + ":" + (e.answer_kind or "")) for e in
                      (exs[: 2 * limit] if limit else exs[:400])]
        answers = self_answers(lm, [e.prompt for e in edgy], max_new_tokens=probe.meta.get("data", {})
                               .get("answers", {}).get("self_answer_tokens", 40))
        feats, owner = response_features(lm, [(p, a) for p, a, _, _ in pairs], [probe.layer])
        s = score(feats)
        y = np.array([pairs[i][2] for i in owner.numpy()])
        group = np.array([pairs[i][3] for i in owner.numpy()])
        ef, eo = response_features(lm, list(zip([e.prompt for e in edgy], answers)), [probe.layer])
        es = score(ef)
        flagged = {int(o) for o, v in zip(eo.numpy(), es) if v >= t}
        per_answer = {}
        for g in sorted(set(group.tolist())):
            owners = {int(o) for o, gg in zip(owner.numpy(), group) if gg == g}
            hit = {int(o) for o, gg, v in zip(owner.numpy(), group, s) if gg == g and v >= t}
            per_answer[g] = len(hit) / max(len(owners), 1)
        report.update({
            "unit": "answer token",
            "held_out_auroc": auroc(y, s),
            "token_flag_rate": {g: rate(s[group == g], t) for g in sorted(set(group.tolist()))},
            "answer_flag_rate": per_answer,
            "edgy_token_fpr": rate(es, t),
            "edgy_answer_flag_rate": len(flagged) / max(len(edgy), 1),
            "counts": {"answers": len(pairs), "tokens": len(y), "edgy": len(edgy)},
        })
    report["cross_dataset_tpr_at_training"] = probe.meta.get("metrics", {}).get("cross_tpr")
    return report


def format_report(r: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"probe kind {r['kind']}  layer {r['layer']}  threshold {r['threshold']:.4f}  model {r['model_id']}",
             f"unit: {r['unit']}",
             f"held-out AUROC: {f(r['held_out_auroc'])}"]
    for key in ("tpr", "benign_fpr_by_set", "token_flag_rate", "answer_flag_rate"):
        if key in r:
            lines.append(f"{key.replace('_', ' ')} at threshold:")
            lines += [f"  {k:<28} {f(v)}" for k, v in r[key].items()]
    for key in ("benign_fpr", "edgy_fpr", "edgy_token_fpr", "edgy_answer_flag_rate"):
        if key in r:
            lines.append(f"{key.replace('_', ' ')}: {f(r[key])}")
    cross = r.get("cross_dataset_tpr_at_training") or {}
    if cross:
        lines.append("cross-dataset TPR (trained without that set):")
        lines += [f"  {k:<28} {f(v)}" for k, v in cross.items()]
    lines.append(f"counts: {r['counts']}")
    return "\n".join(lines)
