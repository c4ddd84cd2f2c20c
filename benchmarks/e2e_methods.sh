#!/usr/bin/env bash
# LoRA and prompt tuning on SmolLM2-135M, trained on 2,000 E2E training pairs and evaluated on the full E2E test set
# (630 meaning representations, all references), next to the zero-shot baseline. Results: runs/bench/e2e-*/.
# CPU time on 2 cores: roughly an hour in all.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/bench}
DATA=${DATA:-../shared/data/e2e_nlg}
COMMON="data=$DATA data.max_train=2000 eval.batch_size=32 eval.max_new_tokens=64"
[ -f "$OUT/e2e-zero-shot/result.json" ] || $BIN/peftlab eval task=table-to-text $COMMON out=$OUT/e2e-zero-shot
[ -f "$OUT/e2e-lora/result.json" ] || $BIN/peftlab train configs/e2e_lora.yaml $COMMON out=$OUT/e2e-lora resume=true
[ -f "$OUT/e2e-prompt-tuning/result.json" ] || \
    $BIN/peftlab train configs/e2e_prompt_tuning.yaml $COMMON out=$OUT/e2e-prompt-tuning resume=true
$BIN/python benchmarks/results_table.py $OUT/e2e-zero-shot/result.json $OUT/e2e-lora/result.json \
    $OUT/e2e-prompt-tuning/result.json
