#!/usr/bin/env bash
# The rerun on SmolLM2-135M: every paper spec retrained with the recipe the recipe study chose, about an
# hour of this 2-core CPU per spec, its rows beside the paper-recipe rows of the same leaderboard (rows are keyed by
# recipe, and each compression build gets its own no-prompt row). Perplexity only; multiple choice on the larger
# subsets is a second pass (MC=1) over the specs named, in MC_DTYPE (default float32: bf16 runs several times
# slower on this AVX2-only CPU; another dtype scores the same fp32 builds, cast) at batch MC_BATCH (default 4).
#
#   RECIPE=ce-lr3e-2 LOSS=ce LR=3e-2 STEPS=400 CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/recipe_rerun.sh
#   RECIPE=... SPECS=gptq:w3g128,sparsegpt:0.5 MC=1 CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/recipe_rerun.sh
#   RECIPE=... TRANSFER=all CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/recipe_rerun.sh   # + the transfer matrix
#
# TRANSFER=all (or a comma list of specs) applies each named spec's new prompt to every other spec of SPECS
# (perplexity only), once all of them are trained: the rows of the transfer matrix. Arguments are passed on
# to ctp-bench (e.g. --dry-run prints the plan).
#
# Resumable: ctp-bench skips finished evaluations and published prompts, and ctp-train resumes from the run folder
# (studies/smollm2-135m/train, small enough to commit between sessions). The top-K teacher cache is shared by
# all specs (same windows, same dense teacher) and lives under runs/rerun/teacher.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
: "${RECIPE:?set RECIPE (the recipe name in prompt and run names)}" "${LOSS:?set LOSS}" "${LR:?set LR}" "${STEPS:?set STEPS}"
SPECS=${SPECS:-gptq:w4,gptq:w3g128,gptq:w2g64,sparsegpt:0.5,sparsegpt:0.625,sparsegpt:0.75,sparsegpt:0.5+gptq:w4}
MC_ARGS=(--mc-tasks '')
if [[ "${MC:-0}" == 1 ]]; then
  MC_ARGS=(--mc-tasks ctp_openbookqa,ctp_hellaswag,ctp_piqa
           --mc-task-limits ctp_hellaswag=1000,ctp_piqa=none,ctp_openbookqa=none
           --mc-dtype "${MC_DTYPE:-float32}" --mc-batch-size "${MC_BATCH:-4}")
fi
TRANSFER=${TRANSFER:-}
[[ "$TRANSFER" == all ]] && TRANSFER=$SPECS
ctp-bench --specs "$SPECS" "${MC_ARGS[@]}" --no-hard-prompt --calib-nsamples 16 --calib-seqlen 512 \
          --ppl-limit 1 --max-length 1124 --no-standard-ppl --val-windows 8 --val-seqlen 1024 \
          --recipe "$RECIPE" --loss "$LOSS" --lr "$LR" --steps "$STEPS" --eval-every "${EVAL_EVERY:-40}" \
          --batch-size "${BATCH:-4}" --seqlen "${SEQLEN:-256}" --teacher-topk "${TOPK:-0}" \
          --out runs/rerun --results-dir leaderboards/smollm2-135m/results --prompts-dir prompts/smollm2-135m \
          --train-dir studies/smollm2-135m/train --leaderboard runs/rerun/leaderboard.md \
          ${TRANSFER:+--transfer-from "$TRANSFER"} "$@"
