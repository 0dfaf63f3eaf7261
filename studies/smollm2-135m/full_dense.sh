#!/usr/bin/env bash
# Full-test (no --limit) evaluation of the dense embedded model on all seven paper tasks, one lm-eval run per
# task so that each results JSON carries its own wall time, then the markdown table via ctp-leaderboard.
# Resumable: a task whose results JSON exists is skipped.
#   CTP_DATA_DIR=../shared/data bash studies/smollm2-135m/full_dense.sh [OUT]
# PPL tasks: fp32, max_length=1124 (1024-token windows + room for a 100-token prompt, as in the leaderboard runs;
# it also bounds lm-eval's standard rolling windows). MC tasks: bf16, batch 32 - full HellaSwag is 40k requests
# (~3.5M tokens), about 2 h in fp32 on 2 CPU cores and half that in bf16. Override with PPL_ARGS / MC_ARGS.
set -euo pipefail
OUT="${1:-leaderboards/smollm2-135m-dense-full}"
PPL_ARGS="${PPL_ARGS:-dtype=float32,max_length=1124}"
MC_ARGS="${MC_ARGS:-dtype=bfloat16}"
BIN="$(dirname "$(command -v python)")"
TASKS=$(python -c "from ctp_eval.presets import PAPER_TASKS; print(*PAPER_TASKS)")  # the ctp_paper group
for task in $TASKS; do
  if compgen -G "$OUT/results/$task/*/results_*.json" > /dev/null; then echo "skip $task: done"; continue; fi
  case "$task" in
    ctp_c4|ctp_ptb|ctp_wikitext2) args="$PPL_ARGS" bs=4 ;;
    *) args="$MC_ARGS" bs=32 ;;
  esac
  echo "== $task ($(date -u +%FT%TZ))"
  /usr/bin/time -f "$task wall %e s" "$BIN/lm_eval" --model ctp --model_args "$args" --tasks "$task" \
    --batch_size "$bs" --output_path "$OUT/results/$task"
done
notes=(); [ -f "$OUT/notes.md" ] && notes=(--notes-file "$OUT/notes.md")
"$BIN/ctp-leaderboard" "$OUT/results" --out "$OUT.md" "${notes[@]}" \
  --title "ctp-eval: dense SmolLM2-135M-Instruct (embedded GGUF), full test sets, no --limit"
