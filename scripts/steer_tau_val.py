"""Choose rds-expert's steering threshold on validation prompts, never on test ones.

    python scripts/steer_tau_val.py OUT_DIR --values monitor,0.5,0.7 [--harmful 40]

The tuned monitor flags answers at its own tau (`rootdefense tune` picks it by exact replay
of undefended answers). Once an answer is flagged, each steered token must score below the
steering threshold (`steer_tau`; by default the flagging monitor's tau). Steering cannot be
replayed from undefended answers, so this script decodes them: the calibration harmful
prompts of `rootdefense tune` (validation split of AdvBench and HarmBench) under every
tuning attack, with the model's tuned defaults and each steering threshold in turn
(`monitor` = the default), judged by the refusal and harm judges. Answers are written to
OUT_DIR/answers.jsonl as they are made (a rerun resumes); the per-value rates are printed
and saved to OUT_DIR/summary.json. Benign answers are not decoded: a benign answer is
steered only once it is flagged, and tuning measures how often that happens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from rootdefense.api import Defender, resolve_settings
from rootdefense.decoding.config import GenerationConfig
from rootdefense.evaluation.attacks import make_attack
from rootdefense.evaluation.base import EvalContext
from rootdefense.evaluation.judging import make_judge
from rootdefense.jsonl import JsonlWriter, read_objects
from rootdefense.models import load_model, normalize_messages
from rootdefense.tuning import TuneSpec, calibration_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--values", default="monitor,0.5,0.7")
    ap.add_argument("--harmful", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    for v in values:
        try:
            ok = v == "monitor" or 0 < float(v) < 1
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"--values: {v!r} is neither 'monitor' nor a number in (0, 1)")
    spec = TuneSpec(harmful=args.harmful)
    harmful, _ = calibration_prompts(spec)
    lm = load_model(args.model)
    ctx = EvalContext(lm=lm, seed=spec.seed, options={})
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "answers.jsonl"
    rows = read_objects(path)
    done = {(r["steer_tau"], r["attack"], r["prompt"]) for r in rows}
    judges = [make_judge("refusal"), make_judge("harm")]
    for j in judges:
        j.setup()
    first = None  # its expert adapter is attached once and shared by every value
    with JsonlWriter(path, append=True) as writer:  # a torn last line from an interrupted run is cut first
        for value in values:
            correction = {} if value == "monitor" else {"steer_tau": float(value)}
            if first is None:
                defender = first = Defender.load(args.model, lm=lm, correction=correction)
            else:
                defender = Defender(lm, first.probe, resolve_settings(lm.model_id, correction=correction),
                                    expert=first.expert)
            jobs = [(a, e) for a in spec.attacks for e in harmful if (value, a, e.prompt) not in done]
            for attack, ex in tqdm(jobs, desc=f"steer_tau {value}", unit="answer"):
                atk = make_attack(attack).apply(ex, ctx)
                gen = defender.generate(messages=atk.messages or normalize_messages(ex.prompt), config=cfg,
                                        prefill=atk.prefill)
                verdicts = {j.name: j.judge([ex.prompt], [gen.text])[0] for j in judges}
                row = {"steer_tau": value, "attack": attack, "prompt": ex.prompt, "id": ex.id, "answer": gen.text,
                       "flags": gen.trace.summary()["flags"],
                       "verdicts": {k: {"label": v.label, "score": v.score} for k, v in verdicts.items()}}
                writer.write(row)
                rows.append(row)
    summary = {}
    for value in values:
        mine = [r for r in rows if r["steer_tau"] == value]
        per = {}
        for attack in spec.attacks:
            rs = [r for r in mine if r["attack"] == attack]
            per[attack] = {"n": len(rs),
                           "harm": round(sum(bool(r["verdicts"]["harm"]["label"]) for r in rs) / max(1, len(rs)), 4),
                           "refusal": round(sum(bool(r["verdicts"]["refusal"]["label"]) for r in rs) / max(1, len(rs)),
                                            4)}
        summary[value] = per
        print(value, json.dumps(per))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
