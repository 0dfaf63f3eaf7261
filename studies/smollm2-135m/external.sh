#!/usr/bin/env bash
# "Prompts on other tools' compressions": SmolLM2-135M quantized by other tools (external_checkpoints.py), each
# evaluated as it is and with a prompt learned on it by the ce-lr3e-2 recipe (the same budget and protocol as the
# spec rows of the leaderboard: 400 steps x 4 x 256 C4 tokens, best C4-validation checkpoint; first shard of each
# perplexity task). Resumable: made checkpoints, finished prompts and evaluations are skipped.
#   LLMC_PY=/path/to/llmc-venv/bin/python CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/external.sh
# CHECKPOINTS (default bnb-nf4,llmc-w4a16) picks the makers; an llm-compressor one needs LLMC_PY (its own venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
CHECKPOINTS=${CHECKPOINTS:-bnb-nf4,llmc-w4a16}
folders=()
for tool in ${CHECKPOINTS//,/ }; do
  folder=runs/external/SmolLM2-135M-$tool
  python studies/smollm2-135m/external_checkpoints.py "$tool" "$folder"
  folders+=("$folder")
done
ctp-bench --specs '' --checkpoints "$(IFS=,; echo "${folders[*]}")" --mc-tasks '' --no-hard-prompt \
          --ppl-limit 1 --max-length 1124 --no-standard-ppl --val-windows 8 --val-seqlen 1024 \
          --recipe ce-lr3e-2 --loss ce --lr 3e-2 --steps 400 --eval-every 40 --batch-size 4 --seqlen 256 \
          --out runs/external --results-dir leaderboards/smollm2-135m/results --prompts-dir prompts/smollm2-135m/external \
          --train-dir studies/smollm2-135m/train --leaderboard runs/external/leaderboard.md "$@"
