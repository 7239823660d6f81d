#!/usr/bin/env bash
# The foundation issue's measurement: 50 held-out AdvBench prompts (test split, never used
# by any probe) and 50 benign prompts (MT-bench turn 1 test split + the held-out half of
# benign-but-edgy), greedy, 128 new tokens; undefended, RDS paper, RDS threshold.
# Usage: scripts/foundation_eval.sh [OUT_DIR]   (resumable: rerun to continue)
set -euo pipefail
OUT=${1:-out/foundation}
mkdir -p "$OUT"
RD=${RD:-rootdefense}
if [ ! -s "$OUT/prompts.jsonl" ]; then
  { $RD data export advbench --split test --limit 50
    $RD data export mtbench --split test --limit 25
    $RD data export edgy --split edgy-eval --limit 25; } > "$OUT/prompts.jsonl"
fi
common=(--input "$OUT/prompts.jsonl" --max-new-tokens 128 --resume)
$RD generate "${common[@]}" --output "$OUT/none.jsonl" --defense none
$RD generate "${common[@]}" --output "$OUT/paper.jsonl" --rule paper
$RD generate "${common[@]}" --output "$OUT/threshold.jsonl" --rule threshold
python "$(dirname "$0")/summarize_runs.py" "$OUT"/none.jsonl "$OUT"/paper.jsonl "$OUT"/threshold.jsonl
