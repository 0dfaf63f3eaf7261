#!/usr/bin/env bash
# Recipe study on SmolLM2-135M: learning rate x loss x training window at one token budget
# (48 steps x 1,024 tokens = 49,152 training tokens per prompt), on gptq:w3g128 and sparsegpt:0.5, each prompt
# selected on C4 validation (8 windows x 1,024 tokens; never test) and evaluated on the first shard of the
# C4 / WikiText-2 / PTB test sets. Every cell is one resumable `ctp-bench` call: rerun the script to continue;
# finished cells are skipped. Results land beside the leaderboard's; prompts and training runs under runs/study.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
COMMON=(--specs gptq:w3g128,sparsegpt:0.5 --mc-tasks '' --no-hard-prompt --calib-nsamples 16 --calib-seqlen 512
        --ppl-limit 1 --max-length 1124 --no-standard-ppl --steps 48 --eval-every 16 --val-windows 8
        --val-seqlen 1024 --out runs/study --results-dir leaderboards/smollm2-135m/results
        --prompts-dir prompts/smollm2-135m/study --train-dir runs/study/train --leaderboard runs/study/leaderboard.md)
# The 4 x 256 arm runs the full grid, KD at lr 1e-1 (lr 3e-2 won at both specs, at the grid's edge), and
# KD from the cached top-64 teacher log-probs (`kd:3e-2:64`, what the rerun uses if it matches full-vocabulary KD:
# a warm cache trains 1.5x faster, bench/teacher_cache.py).
# `ce:3e-2::74` is CE at equal training time rather than equal tokens: CE trains ~1.55x faster than KD with the
# teacher on the fly (143 vs 92 tok/s), so 74 CE steps cost what 48 KD steps cost (the rerun's budget is time).
# The 1 x 1024 arm (window length at equal tokens) runs only the winning learning rate of each loss in the
# 4 x 256 arm (LONG_CELLS): each cell costs ~28 min of this CPU, and the question it answers is the window length.
SHORT_CELLS=${SHORT_CELLS-"kd:1e-2 kd:3e-2 ce:1e-2 kd:3e-2:64 kd:1e-1 ce:3e-2 ce:3e-2::74 kd:3e-3 ce:3e-3"}
LONG_CELLS=${LONG_CELLS-"kd:3e-2 ce:3e-2"}
run_cell() {  # loss:lr[:topK[:steps]] batch seqlen
  local loss lr topk steps name
  IFS=: read -r loss lr topk steps <<<"$1"
  name="study-$loss${topk:+-top$topk}-lr$lr-s$3${steps:+-n$steps}"
  ctp-bench "${COMMON[@]}" --recipe "$name" --loss "$loss" --lr "$lr" --teacher-topk "${topk:-0}" \
            --batch-size "$2" --seqlen "$3" ${steps:+--steps "$steps"}
}
for cell in $SHORT_CELLS; do run_cell "$cell" 4 256; done
for cell in $LONG_CELLS; do run_cell "$cell" 1 1024; done
