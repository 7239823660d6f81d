"""Undefended vs RDS exact decoding speed, side by side in one process: for each prompt
the three decoders run back to back, so machine noise hits them alike. Prints medians.
Usage: python scripts/speed_compare.py [N_PER_SET] [MAX_NEW_TOKENS]
(`rootdefense bench`, with JSON output, is the speculative-decoding issue's job.)"""

import statistics
import sys

from rootdefense.api import Defender
from rootdefense.data.split import held_out
from rootdefense.decoding import GenerationConfig
from rootdefense.models import load_model

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
lm = load_model("smollm2-135m")
harmful = [e.prompt for e in held_out("advbench")][-n:]
benign = [e.prompt for e in held_out("edgy")][-n:]
runs = {"undefended": Defender.load(lm=lm, defense="none", monitor=False),
        "rds paper": Defender.load(lm=lm, defense="rds", rule="paper"),
        "rds threshold": Defender.load(lm=lm, defense="rds", rule="threshold")}
cfg = GenerationConfig(max_new_tokens=tokens)
ms = {(name, kind): [] for name in runs for kind in ("harmful", "benign")}
for kind, prompts in (("harmful", harmful), ("benign", benign)):
    for p in prompts:
        for name, d in runs.items():
            g = d.generate(p, config=cfg)
            ms[(name, kind)].append(g.timings["ms_per_token"])
print(f"{'decoder':<15} {'set':<8} {'ms/token':>9} {'tok/s':>7} {'x undefended':>13}")
for (name, kind), vals in ms.items():
    med = statistics.median(vals)
    base = statistics.median(ms[("undefended", kind)])
    print(f"{name:<15} {kind:<8} {med:>9.1f} {1000 / med:>7.1f} {base / med:>13.2f}")
