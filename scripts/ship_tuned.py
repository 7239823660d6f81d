"""Ship a model's tuned defaults with the probes they were measured with.

    python scripts/ship_tuned.py [MODEL]      # default: smollm2-135m

Copies ``defaults.json`` and the response, query and paper probes from the rootdefense
home into ``src/rootdefense/tuned/``. `rootdefense prepare` installs those probes on a fresh
machine instead of training its own (probe training is not bit-reproducible across
machines), so a fresh install decodes as measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rootdefense.defaults import ship_tuned

if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    for p in ship_tuned(model, Path(__file__).resolve().parents[1] / "src" / "rootdefense" / "tuned"):
        print(p)
