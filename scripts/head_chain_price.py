"""Price draft-head chains on the target's own answers, without timing noise.

    python scripts/head_chain_price.py BENCH_JSON HEAD_DIR [HEAD_DIR ...] [--val 96] [--out F]

For every third position of the saved held-out answers (`distill-val-{N}x128`, the target's
greedy answers to val-split ShareGPT prompts, made by `rootdefense draft train
--val-prompts N`), each head drafts a chain of up to 5 tokens from the target's recorded
features, as the drafter does (its own predicted features from the second token on). A
draft counts while it equals the target's greedy path. A policy that drafts L tokens makes
one verify forward over L + 1 tokens, priced by BENCH_JSON's `profile.chain_cost_vs_one_token`
(1.0 = a one-token forward); it yields 1 + accepted tokens. Printed per head: first-guess
accuracy, acceptance after each accepted token, and tokens per forward and per unit of cost
for fixed chain lengths 0-5. Positions are sampled uniformly, not along a decode, so the
figures compare heads and chain lengths; `rootdefense bench` gives the end-to-end speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rootdefense.drafting.head import load_head, load_rows, tap_note, tap_tag
from rootdefense.drafting.head.network import target_decoder
from rootdefense.drafting.head.training import chain_marks
from rootdefense.models import load_model
from rootdefense.paths import head_dir

MAX_CHAIN = 5


def chains(head, val, lm) -> list[list[bool]]:
    """Per sampled position: whether drafts 1..MAX_CHAIN are still on the target's path."""
    decoder = target_decoder(lm.model)
    rows = lm.model.get_output_embeddings().weight.detach().float()[head.vocab_ids]
    return chain_marks(head, val, lm.model.get_input_embeddings(), decoder.rotary_emb, rows, lm.device,
                         MAX_CHAIN, stride=3)


def price(marks: list[list[bool]], cost: dict[int, float]) -> dict:
    first = sum(m[0] for m in marks) / len(marks)
    after = [round(sum(m[s] for m in marks) / max(1, sum(m[s - 1] for m in marks)), 3) for s in range(1, MAX_CHAIN)]
    fixed = {}
    for length in range(MAX_CHAIN + 1):
        tokens = sum(1 + sum(1 for ok in m[:length] if ok) for m in marks)  # marks are prefix-closed
        fixed[length] = {"tokens_per_forward": round(tokens / len(marks), 3),
                         "tokens_per_cost": round(tokens / (cost[length + 1] * len(marks)), 3)}
    return {"positions": len(marks), "first_guess": round(first, 4), "after_a_hit": after, "fixed_chain": fixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("heads", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--val", type=int, default=96, help="held-out answers saved by draft train --val-prompts")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cost = {int(k): v for k, v in json.loads(args.bench.read_text())["profile"]["chain_cost_vs_one_token"].items()}
    lm = load_model(args.model)
    folder = head_dir(lm.model_id)

    def held_out(taps) -> list[dict]:
        """The saved held-out answers with the features a head of these taps reads."""
        rows = load_rows(folder / f"distill-val-{tap_tag(taps)}{args.val}x128.safetensors",
                           {"model_id": lm.model_id, "prompts": args.val, "answer_tokens": 128,
                            "source": "sharegpt val split, the target's greedy answers" + tap_note(taps)})
        if rows is None:
            taps_flag = f" --taps {','.join(map(str, taps))}" if taps else ""
            raise SystemExit(f"no saved held-out answers for {args.val} prompts in {folder}: "
                             f"run `rootdefense draft train --val-prompts {args.val}{taps_flag}` first")
        return rows

    val = held_out(())
    report = {"bench_profile": str(args.bench), "cost": cost, "val_answers": len(val), "heads": {}}
    for d in args.heads:
        head, meta = load_head(d, lm)
        rows = held_out(head.taps)
        if [r["ids"].tolist() for r in rows] != [r["ids"].tolist() for r in val]:
            raise SystemExit(f"the held-out answers saved for taps {head.taps} differ from the untapped ones")
        report["heads"][d] = {"val_top1_in_meta": meta["train"].get("val_top1"), **price(chains(head.float(), rows, lm),
                                                                                           cost)}
        print(d, json.dumps(report["heads"][d]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
