"""What the top-K teacher cache saves: `ctp-train` training speed with distillation computed on the fly, from a
cold cache (first run fills it), from a warm one (a later run or spec on the same windows), and with plain CE.

    CTP_DATA_DIR=../shared/data python bench/teacher_cache.py                 # gptq:w3g128 SmolLM2, 4 x 256, 12 steps
    CTP_DATA_DIR=../shared/data python bench/teacher_cache.py --steps 24 --topk 64 --compression sparsegpt:0.5

Each variant is one `ctp-train` process on the same compressed model (from the compression cache), the same
windows and settings; tokens/s is the median of the per-step figures ctp-train logs (train_log.jsonl), the first
--skip steps left out (warmup, first allocations). Validation runs only on one window at step 0 and the end and is
not in the figure. The runs go in order kd, kd-cold, kd-warm, ce, --repeats times; kd-cold gets a fresh cache
folder every repeat. Quote figures from an idle machine only (the load average is printed).

The point: a rerun trains every spec on the same windows with the same dense teacher, so the teacher's
forward is paid once for all specs when cached, and KD then costs what CE costs per step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)

from ctp_eval.train.runlog import read_run_log

VARIANTS = ("kd", "kd-cold", "kd-warm", "ce")


def run(variant: str, repeat: int, work: Path, args) -> float:
    out, cache = work / f"{variant}-{repeat}", work / f"cache-{repeat}"  # kd-cold fills cache-N, kd-warm reads it
    cmd = ["ctp-train", "--out", str(out), "--compression", args.compression, "--calib-nsamples", str(args.calib_nsamples),
           "--calib-seqlen", str(args.calib_seqlen), "--k", str(args.k), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--eval-every", str(10 * args.steps),
           "--save-every", str(10 * args.steps), "--val-windows", "1", "--lr", "3e-2", "--no-progress",
           "--loss", "ce" if variant == "ce" else "kd"]
    if args.model:
        cmd += ["--model", args.model]
    if variant in ("kd-cold", "kd-warm"):
        cmd += ["--teacher-topk", str(args.topk), "--teacher-cache", str(cache)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    speeds = [r["tok_s"] for r in read_run_log(out / "train_log.jsonl") if "tok_s" in r and r["step"] > args.skip]
    shutil.rmtree(out)
    return statistics.median(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    ap.add_argument("--compression", default="gptq:w3g128")
    ap.add_argument("--calib-nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="leave the first N steps out of the median")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    print(f"machine: {machine()}\nload average before: {load()}")
    print(f"{args.compression}, k={args.k}, {args.batch_size} x {args.seqlen}, {args.steps} steps "
          f"(median of steps > {args.skip}), top-K {args.topk}")
    results = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ctp-teacher-cache-") as tmp:
        work = Path(tmp)
        for r in range(args.repeats):
            for v in VARIANTS:
                results[v].append(run(v, r, work, args))
                print(f"  repeat {r + 1} {v:8s} {results[v][-1]:7.1f} tok/s", flush=True)
    med = {v: statistics.median(x) for v, x in results.items()}
    for v in VARIANTS:
        print(f"{v:8s} {med[v]:7.1f} tok/s (median of {args.repeats})")
    print(f"ratio kd-warm / kd (on the fly): {med['kd-warm'] / med['kd']:.2f}")
    print(f"ratio kd-cold / kd (on the fly): {med['kd-cold'] / med['kd']:.2f}")
    print(f"ratio kd-warm / ce:              {med['kd-warm'] / med['ce']:.2f}")
    print(f"ratio ce / kd (on the fly):      {med['ce'] / med['kd']:.2f}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
