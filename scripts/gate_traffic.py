"""How often does ordinary traffic arm rds-expert's strict monitor?

The shipped defaults watch a request whose query-probe score reaches the gate (0.9 for the
embedded model) with a stricter monitor; a benign request the gate lets through as harmful
is the main road to a false refusal (results/safety/README.md). This script reads the gate's
score for every held-out MT-bench question and ShareGPT user turn (the test split; real
requests with code, typos and pasted text), exactly where the engine reads it (the last
prompt token, the query probe's layer, the prompt as the chat template encodes it), and
writes one JSON line per request and a summary: the share armed, overall and for requests
that open with a persona instruction ("Act as ...", "Pretend ...", "You are ...").

Requests longer than --max-tokens prompt tokens are skipped and counted (CPU time).

    python scripts/gate_traffic.py [--out results/safety/ordinary/gate.jsonl] [--max-tokens 1024]
        [--model smollm2-135m] [--probe FOLDER (default: the model's query probe)] [--gate G (default: tuned)]
        [--limit N (first N held-out requests per source)]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from rootdefense.api import find_probe, resolve_settings
from rootdefense.data.split import held_out
from rootdefense.jsonl import JsonlWriter
from rootdefense.models import load_model
from rootdefense.probes.base import LinearProbe
from rootdefense.probes.features import prompt_ids, query_features

PERSONA = re.compile(r"\s*(?:i want you to act|act as|pretend|you are|you're|imagine you(?:'re| are)|role-?play|"
                     r"play the role|from now on,? you)", re.IGNORECASE)
SOURCES = ("mtbench", "sharegpt")


def held_out_traffic(lm, max_tokens: int, limit: int | None = None) -> tuple[list[tuple], dict[str, int]]:
    """((source, example, prompt tokens) of every held-out request of SOURCES up to
    ``max_tokens`` prompt tokens (the first ``limit`` per source), how many longer ones each
    source had)."""
    items, skipped = [], {s: 0 for s in SOURCES}
    for source in SOURCES:
        for e in held_out(source, limit):
            n = len(prompt_ids(lm, e.prompt))
            if n > max_tokens:
                skipped[source] += 1
            else:
                items.append((source, e, n))
    return items, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/safety/ordinary/gate.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--probe", type=Path, default=None)
    ap.add_argument("--gate", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    torch.set_num_threads(2)
    lm = load_model(args.model)
    probe = LinearProbe.load(args.probe) if args.probe else find_probe(lm.model_id, "query")
    gate = args.gate if args.gate is not None else resolve_settings(lm.model_id).correction["gate"]
    items, skipped = held_out_traffic(lm, args.max_tokens, args.limit)
    states = query_features(lm, [e.prompt for _, e, _ in items], [probe.layer], batch_size=8)
    scores = probe.score(states[:, 0]).tolist()
    rows = [{"source": source, "id": e.id, "prompt": e.prompt[:300], "prompt_tokens": n,
             "persona": bool(PERSONA.match(e.prompt)), "query_score": round(s, 4), "armed": s >= gate}
            for (source, e, n), s in zip(items, scores, strict=True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(args.out, append=False) as out:
        for r in rows:
            out.write(r)
    summary = {"gate": gate, "max_prompt_tokens": args.max_tokens, "skipped_longer": skipped, "by": {}}
    for source in SOURCES:
        for persona in (None, True, False):
            part = [r for r in rows if r["source"] == source and (persona is None or r["persona"] == persona)]
            key = source + {None: "", True: ":persona", False: ":other"}[persona]
            summary["by"][key] = {"requests": len(part), "armed": sum(r["armed"] for r in part)}
    args.out.with_name("gate-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
