"""Re-read the query scores of a `rootdefense tune` calibration file with another query probe.

The undefended answers and their response-probe harms do not depend on the query probe, so a
gate read by another query probe can be tuned on the same answers: this copies SRC to DST with
every request's query score read by the probe in PROBE_DIR exactly as tuning.collect reads it
(the same request under the same attack template), and the header's query-probe sha256 set to
that probe's. Then, with that probe in a home's query folder and DST as its calibration.jsonl:
`rootdefense tune --reuse --benign N ...` (N as the file was made with). Armed benign answers
(`tune --armed`) are re-scored too, but they stay the requests the first probe chose.

    python scripts/rescore_calibration.py SRC DST PROBE_DIR BENIGN [MODEL]   # MODEL: smollm2-135m
"""

import json
import sys
from pathlib import Path

import torch

from rootdefense.defaults import weights_sha256
from rootdefense.evaluation.base import EvalContext
from rootdefense.models import load_model, normalize_messages
from rootdefense.probes.base import LinearProbe
from rootdefense.tuning import TuneSpec, calibration_jobs, calibration_prompts, calibration_request, query_score


def main() -> None:
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    src, dst, probe_dir, benign = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    lm = load_model(sys.argv[5] if len(sys.argv) == 6 else "smollm2-135m")
    query = LinearProbe.load(probe_dir)
    spec = TuneSpec(benign=benign)
    jobs = {(a, e.prompt, h): (a, i, e) for a, i, e, h in calibration_jobs(spec, *calibration_prompts(spec))}
    ctx = EvalContext(lm=lm, seed=spec.seed, options={})
    out = []
    for r in (json.loads(line) for line in src.read_text().splitlines()):
        if r.get("kind") == "calibration":
            r["query_probe_sha256"] = weights_sha256(probe_dir)
        elif "harms" in r:  # an armed benign answer (TuneSpec.armed) was asked plainly
            messages = normalize_messages(r["prompt"]) if r.get("armed") else \
                calibration_request(*jobs[(r["attack"], r["prompt"], r["harmful"])], ctx)[0]
            r["query_score"] = query_score(lm, query, messages)
        out.append(r)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in out))
    print("rescored", sum("harms" in r for r in out))


if __name__ == "__main__":
    main()
