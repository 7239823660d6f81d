"""Re-read the query scores of a `rootdefense tune` calibration file with another query probe.

The undefended answers and their response-probe harms do not depend on the query probe, so a
gate read by another query probe can be tuned on the same answers: this copies SRC to DST with
every request's query score read by the probe in PROBE_DIR exactly as tuning.collect reads it
(the attack rebuilt from the same template index), and the header's query-probe sha256 set to
that probe's. Then, with that probe in a home's query folder and DST as its calibration.jsonl:
`rootdefense tune --reuse --benign N ...` (N as the file was made with).

    python scripts/rescore_calibration.py SRC DST PROBE_DIR BENIGN
"""
import sys, json, torch
from pathlib import Path
torch.set_num_threads(2)
from rootdefense.models import load_model, encode_chat, normalize_messages
from rootdefense.probes.base import LinearProbe
from rootdefense.evaluation.attacks import make_attack
from rootdefense.evaluation.base import EvalContext
from rootdefense.data.records import Example
from rootdefense.defaults import weights_sha256
from rootdefense.tuning import calibration_prompts, TuneSpec
src, dst, probe_dir, benign = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
lm = load_model("smollm2-135m")
q = LinearProbe.load(probe_dir)
spec = TuneSpec(benign=benign)
harmful, ben = calibration_prompts(spec)
index = {}
for a in spec.attacks:
    for i, e in enumerate(harmful): index[(a, e.prompt, True)] = (i, e)
for a in spec.benign_attacks:
    for i, e in enumerate(ben): index[(a, e.prompt, False)] = (i, e)
ctx = EvalContext(lm=lm, seed=spec.seed, options={})
lines = [json.loads(l) for l in src.read_text().splitlines()]
out = []
for r in lines:
    if r.get("kind") == "calibration":
        r["query_probe_sha256"] = weights_sha256(probe_dir)
    elif "harms" in r:
        i, e = index[(r["attack"], r["prompt"], r["harmful"])]
        ap = make_attack(r["attack"]).apply(e, ctx, i) if r["attack"] != "none" else None
        messages = ap.messages if ap else normalize_messages(e.prompt)
        with torch.no_grad():
            ids = encode_chat(lm.tokenizer, messages)
            hs = lm.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
            r["query_score"] = round(float(q.score(hs[q.layer][0, -1:].float())[0]), 5)
    out.append(r)
dst.parent.mkdir(parents=True, exist_ok=True)
dst.write_text("".join(json.dumps(r) + "\n" for r in out))
print("rescored", sum("harms" in r for r in out))
