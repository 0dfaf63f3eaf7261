#!/usr/bin/env bash
# LoRA baseline (the paper's Tables 1, 3 and 7): r=32, alpha=32, dropout 0.1 on the q/v projections, trained on the
# same C4 windows and token budget as the `ce-lr3e-2` prompts (400 steps x 4 x 256 = 409,600 tokens, best checkpoint
# on C4 validation at 1,024 tokens), then scored through `ctp` with HFLM's own `peft=` on the first shard of each
# perplexity task, as the prompt rows are. LR=2e-4 is the paper's; NAME names the recipe (e.g. LR=1e-3
# NAME=lora-lr1e-3 for a sweep cell). Resumable: ctp-train resumes its checkpoint, finished evaluations are skipped.
#   CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/lora.sh
#   SPECS=gptq:w3g128 LR=1e-3 NAME=lora-lr1e-3 CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/lora.sh
# SWEEP="2e-4 1e-3 3e-3 1e-2" runs the learning-rate sweep instead, the way the prompt recipe was chosen
# (studies/smollm2-135m/recipe_study.sh): 48 steps x 4 x 256 = 49,152 tokens per cell, validation every 16 steps,
# recipes named study-lora-lr<LR>-s256 (the leaderboard's recipe-study table), on SPECS (default gptq:w3g128: the
# paper's LoRA tables are on 3-bit models).
# MC=1 also scores the multiple-choice subsets the prompt rows use (OBQA and PIQA whole, HellaSwag's first 1,000;
# fp32, batch 4), once the adapter exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CTP_DATA_DIR:?set CTP_DATA_DIR to the data folder}"
if [[ -n "${SWEEP:-}" ]]; then
  for lr in $SWEEP; do
    SPECS=${SPECS:-gptq:w3g128} STEPS=48 EVAL_EVERY=16 LR=$lr NAME=study-lora-lr$lr-s256 MC=0 SWEEP= bash studies/smollm2-135m/lora.sh
  done
  exit 0
fi
SPECS=${SPECS:-gptq:w3g128,sparsegpt:0.5,sparsegpt:0.5+gptq:w4}
LR=${LR:-2e-4}
NAME=${NAME:-lora-paper}
STEPS=${STEPS:-400}
EVAL_EVERY=${EVAL_EVERY:-40}
CALIB="calib_nsamples=16,calib_seqlen=512"
for spec in ${SPECS//,/ }; do
  slug=$(python -c "from ctp_eval.files import slug; print(slug('$spec'))")
  out=studies/smollm2-135m/train/$slug-$NAME
  # warm-up: ctp-train's default, steps / 10, as the prompts'
  ctp-train --method lora --compression "$spec" --calib-nsamples 16 --calib-seqlen 512 --steps "$STEPS" \
            --batch-size 4 --seqlen 256 --lr "$LR" --val-windows 8 --val-seqlen 1024 --eval-every "$EVAL_EVERY" \
            --save-every "$EVAL_EVERY" --recipe-name "$NAME" --out "$out" --resume --no-progress
  args="compression=$spec,$CALIB,peft=$out/adapter,dtype=float32,max_length=1124"
  results=leaderboards/smollm2-135m/results/$slug-$NAME-ppl
  if compgen -G "$results/*/results_*.json" > /dev/null; then echo "skip $results: done"; else
    lm_eval --model ctp --model_args "$args" --tasks ctp_c4,ctp_wikitext2,ctp_ptb --limit 1 \
            --metadata '{"ppl_standard": false}' --batch_size 4 --output_path "$results"
  fi
  [[ "${MC:-0}" == 1 ]] || continue
  for part in "mc-all ctp_openbookqa,ctp_piqa" "mc-limit1000 ctp_hellaswag"; do
    read -r name tasks <<< "$part"
    results=leaderboards/smollm2-135m/results/$slug-$NAME-$name
    if compgen -G "$results/*/results_*.json" > /dev/null; then echo "skip $results: done"; continue; fi
    lm_eval --model ctp --model_args "$args" --tasks "$tasks" --batch_size 4 --output_path "$results" \
            $([[ $name == mc-limit1000 ]] && echo --limit 1000)
  done
done
