#!/usr/bin/env bash
# The GPU checks in one run, on a machine with CUDA: the CUDA tests (tests/test_cuda.py), then the speed ratios
# (evaluation prompt overhead, training speed and memory vs a PEFT loop) in bf16 on random-weight models of
# SmolLM2-135M's and Llama-3.2-1B's shapes (bench/shape_model.py: timings need the shape, not the weights).
#
#   LIKE=DIR CTP_DATA_DIR=../shared/data bash bench/gpu_check.sh
#
# LIKE: a folder with a config.json and tokenizer files (default .gpu/smol: SmolLM2-135M's, saved by
# `load_model_and_tokenizer(None)`); CTP_DATA_DIR: WikiText-2 test for the evaluation workload; WHEELS: a folder
# of wheels to install first (a machine without a package index); OUT: where the logs go (default runs/gpu);
# ONLY: space-separated step names to run (default all). Each step has its own time limit and log, so one failing
# step leaves the others' figures. Training is timed at the CPU figures' settings (4 x 256, launch-bound on a GPU)
# and at 8 x 1024.
set -uo pipefail
OUT=${OUT:-runs/gpu}
LIKE=${LIKE:-.gpu/smol}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, show its tail
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s"
  grep -v "it/s]\|s/it]" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, lm_eval, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'datasets', datasets.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step pytest_gpu 200 python3 -m pytest -m gpu tests/test_cuda.py -q -p no:cacheprovider -rfEs
ONE_B=(--set hidden_size=2048 --set intermediate_size=8192 --set num_hidden_layers=16 --set num_attention_heads=32
       --set num_key_value_heads=8 --set head_dim=64)
step shapes 90 bash -c "python3 bench/shape_model.py --like $LIKE --out /tmp/1b-shape ${ONE_B[*]} &&
  python3 bench/shape_model.py --like $LIKE --out /tmp/smol-shape"
TRAIN=(bench/train_speed.py --device cuda --dtypes bfloat16 --repeats 2 --steps 10 --warmup 3)
step train_1b 150 python3 "${TRAIN[@]}" --model /tmp/1b-shape --variants ctp,ctp-shared,ctp-full,peft
step train_1b_8x1024 120 python3 "${TRAIN[@]}" --model /tmp/1b-shape --variants ctp,ctp-shared,peft --batch-size 8 --seqlen 1024
step overhead_1b 100 python3 bench/prompt_overhead.py --model /tmp/1b-shape --device cuda --dtype bfloat16 \
  --repeats 3 --modes cache,prepend
step train_smol 120 python3 "${TRAIN[@]}" --model /tmp/smol-shape --variants ctp,peft
step overhead_smol 100 python3 bench/prompt_overhead.py --model /tmp/smol-shape --device cuda --dtype bfloat16 \
  --repeats 3 --modes cache,prepend
