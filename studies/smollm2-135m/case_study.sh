#!/usr/bin/env bash
# Generation case study (the paper's Figure 1, in spirit): the dense model, sparsegpt:0.625 (the paper's example),
# and sparsegpt:0.625 with the paper's hard prompt and with its learned `ce-lr3e-2` prompt answer the questions of
# tasks/ctp_case_study.yaml greedily. Each configuration is one `lm_eval --model ctp ... --log_samples` run whose
# results and samples land beside the leaderboard's; `ctp-leaderboard` renders the answers side by side.
# Resumable: a configuration whose results exist is skipped.
#   CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/case_study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder (calibration of the compressed model)}"
RESULTS=leaderboards/smollm2-135m/results
SPEC="compression=sparsegpt:0.625,calib_nsamples=16,calib_seqlen=512"
PROMPT=prompts/smollm2-135m/sparsegpt-0-625-k100-ce-lr3e-2.safetensors
run() {  # name model_args
  if compgen -G "$RESULTS/$1/*/results_*.json" > /dev/null; then echo "skip $1: done"; return; fi
  lm_eval --model ctp --model_args "$2,dtype=float32" --tasks ctp_case_study --batch_size 6 --log_samples \
          --output_path "$RESULTS/$1"
}
run dense-case-study "pretrained=smollm2"
run sparsegpt-0-625-none-case-study "$SPEC"
run sparsegpt-0-625-hard-case-study "$SPEC,hard_prompt=paper"
run sparsegpt-0-625-learned-ce-lr3e-2-case-study "$SPEC,prompt=$PROMPT"
