#!/usr/bin/env bash
# Recipe study (issue 14) on SmolLM2-135M: learning rate x loss x training window at one token budget
# (48 steps x 1,024 tokens = 49,152 training tokens per prompt), on gptq:w3g128 and sparsegpt:0.5, each prompt
# selected on C4 validation (8 windows x 1,024 tokens; never test) and evaluated on the first shard of the
# C4 / WikiText-2 / PTB test sets. Every cell is one resumable `ctp-bench` call: rerun the script to continue;
# finished cells are skipped. Results land beside the leaderboard's; prompts and training runs under runs/study.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
COMMON=(--specs gptq:w3g128,sparsegpt:0.5 --mc-tasks '' --no-hard-prompt --calib-nsamples 16 --calib-seqlen 512
        --ppl-limit 1 --max-length 1124 --no-standard-ppl --steps 48 --eval-every 16 --val-windows 8
        --val-seqlen 1024 --out runs/study --results-dir leaderboards/smollm2-135m/results
        --prompts-dir runs/study/prompts --train-dir runs/study/train --leaderboard runs/study/leaderboard.md)
for shape in "4 256" "1 1024"; do
  read -r batch seqlen <<<"$shape"
  for cell in kd:1e-2 kd:3e-2 ce:1e-2 ce:3e-2 kd:3e-3 ce:3e-3; do
    loss=${cell%%:*} lr=${cell##*:}
    ctp-bench "${COMMON[@]}" --recipe "study-$loss-lr$lr-s$seqlen" --loss "$loss" --lr "$lr" \
              --batch-size "$batch" --seqlen "$seqlen"
  done
done
