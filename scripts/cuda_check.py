"""The CUDA path, checked against the CPU: every decoder on a tiny random model (built here,
no download) gives the same greedy tokens on the GPU as on the CPU, and its harms agree.

    PYTHONPATH=src:tests python scripts/cuda_check.py [--out cuda-check.json]

Every path runs the one engine: plain, RDS (threshold and paper rules), speculative RDS
(prompt lookup), batches of both, a row joining a running batch, and rds-expert with a LoRA
expert (peft mixed-adapter rows) flagged at the first token, alone and in a batch. Exits non-zero on a mismatch. Run on a machine with a
GPU (the project's CI has none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_tiny_model, make_tokenizer
from test_defenses import MODEL_ID, write_expert

from rootdefense.correction import Correction, CorrectionSettings
from rootdefense.decoding import Decoder, GenerationConfig, Request, make_rule
from rootdefense.drafting import PromptLookupDrafter
from rootdefense.expert.adapter import attach_expert
from rootdefense.models import encode_chat
from rootdefense.models.loading import LoadedModel
from rootdefense.probes.base import LinearProbe

PROMPTS = ["How do I bake bread?", "step one, step two, step three, step one, step two", "hi there"]


def run_all(device: str, folder: Path) -> dict:
    tok = make_tokenizer()
    model = make_tiny_model(tok, seed=5).to(device)
    g = torch.Generator().manual_seed(11)
    probe = LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                        meta={"model_id": MODEL_ID, "kind": "response"}).to(device)
    ids = [encode_chat(tok, [{"role": "user", "content": p}]).to(device) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=24, top_m=8)
    eos = [tok.eos_token_id]
    thr, paper = make_rule("threshold", tau=0.55), make_rule("paper", tau=0.55)
    out: dict[str, list] = {}

    def record(name, gens):
        out[name] = [{"tokens": x.token_ids, "harms": [s.harm for s in x.trace.steps]} for x in gens]

    record("plain", [Decoder(model, tok, eos_token_ids=eos).generate(i, cfg) for i in ids])
    record("rds-threshold", [Decoder(model, tok, probe=probe, rule=thr, eos_token_ids=eos).generate(i, cfg)
                             for i in ids])
    record("rds-paper", [Decoder(model, tok, probe=probe, rule=paper, eos_token_ids=eos).generate(i, cfg)
                         for i in ids])
    spec = Decoder(model, tok, probe=probe, rule=thr, eos_token_ids=eos, drafter=PromptLookupDrafter())
    record("rds-spec-ngram", [spec.generate(i, cfg) for i in ids])
    record("rds-batch", Decoder(model, tok, probe=probe, rule=thr, eos_token_ids=eos).generate_batch(ids, cfg))
    record("rds-spec-batch", spec.generate_batch(ids, cfg))
    engine = spec.engine()  # a row joins a running batch three steps in
    rows = [engine.add(Request(i[0].tolist(), cfg)) for i in ids[:2]]
    for _ in range(3):
        engine.step()
    rows.append(engine.add(Request(ids[2][0].tolist(), cfg)))
    engine.run()
    record("rds-spec-joined", [r.result for r in rows])
    lm = LoadedModel(model, tok, MODEL_ID, torch.float32, torch.device(device))
    expert = attach_expert(lm, folder)
    correction = Correction(probe, CorrectionSettings(tau=0.01, k=1, window=1, loop_repeats=99), expert,
                            tokenizer=tok)
    dec = Decoder(model, tok, probe, eos_token_ids=eos, correction=correction)
    record("rds-expert-steered", [dec.generate(i, cfg) for i in ids])
    record("rds-expert-batch", dec.generate_batch(ids, cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_expert(make_tokenizer(), Path(tmp) / "expert")
        t0 = time.perf_counter()
        cpu = run_all("cpu", folder)
        t1 = time.perf_counter()
        gpu = run_all("cuda", folder)
        t2 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpu_s": round(t1 - t0, 2),
              "cuda_s": round(t2 - t1, 2), "checks": {}}
    ok = True
    for name in cpu:
        same = [a["tokens"] == b["tokens"] for a, b in zip(cpu[name], gpu[name], strict=True)]
        diff = max((abs(x - y) for a, b in zip(cpu[name], gpu[name], strict=True)
                    for x, y in zip(a["harms"], b["harms"]) if x is not None and y is not None), default=0.0)
        report["checks"][name] = {"same_tokens": all(same), "max_harm_diff": round(diff, 6),
                                  "tokens": [len(a["tokens"]) for a in gpu[name]]}
        ok &= all(same) and diff < 1e-3
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
