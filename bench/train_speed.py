"""Speed and memory of ctp-train's step vs an equivalent PEFT PromptTuning loop (same model, k, batch, seqlen, dtype).

    python bench/train_speed.py --batch-size 2 --seqlen 256 --steps 5           # SmolLM2-135M, CPU
    python bench/train_speed.py --model HF_ID --dtype bfloat16 --device cuda     # GPU

Each variant runs in its own subprocess so that neither sees the other's allocations:
  ctp       `ctp_eval.train.train_step` as ctp-train runs it (chunked LM-head loss, text positions only)
  ctp-full  the same step with --loss-chunk 0 (full (B, T, V) logits through forward_with_prompt)
  peft      get_peft_model(PromptTuningConfig) + `model(input_ids, labels=ids).loss` + AdamW + clipping
With --interleave, speed is also measured with all variants in one process, their steps alternated, which is
the fair comparison on a shared machine whose load drifts (memory still comes from the separate processes).
Timed: `--steps` optimizer steps after `--warmup` untimed ones. Memory: on CUDA, max_memory_allocated during
the steps; on CPU, the peak resident set sampled every 2 ms from the loaded model until the last step,
minus the RSS right after loading (the model itself is the same for all three).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

VARIANTS = ("ctp", "ctp-full", "peft")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident set size, sampled by a background thread (CPU has no allocator peak counter)."""

    def __init__(self, every: float = 0.002):
        self.peak, self.every, self._stop = _rss(), every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _setup(args):
    import torch

    from ctp_eval.models import load_model_and_tokenizer

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model, tok = load_model_and_tokenizer(args.model, dtype=dtype, device=args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch_size, args.seqlen), generator=gen).to(args.device)
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == torch.bfloat16 else None
    return model, tok, ids, autocast


def _make_step(variant, args, model, tok, ids, autocast):
    """(step function, trainable params) of one variant on an already loaded model."""
    import torch

    if variant == "peft":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        peft_model = get_peft_model(model, PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=args.k, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast or torch.autocast("cpu", enabled=False):
                loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    else:
        from ctp_eval.train import TrainConfig, build_tuner, make_optimizer, train_step

        cfg = TrainConfig(out="-", k=args.k, seqlen=args.seqlen, batch_size=args.batch_size, steps=1000,
                          dtype=args.dtype, loss_chunk=0 if variant == "ctp-full" else args.loss_chunk)
        tuner = build_tuner(model, tok, cfg)
        opt, sched = make_optimizer(tuner, cfg)
        params = tuner.parameters()

        def step():
            train_step(tuner, opt, sched, ids, cfg.max_grad_norm, autocast)
    return step, params


def interleaved(args) -> dict:
    """Speed only, all variants in one process, steps alternated (ABCABC...): on a shared machine whose load
    changes by the minute, this compares like with like far better than runs one after the other."""
    import statistics

    import torch

    model, tok, ids, autocast = _setup(args)
    variants = args.variants.split(",")
    steps = {v: _make_step(v, args, model, tok, ids, autocast)[0] for v in variants}
    model.train()
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in variants:
            t0 = time.perf_counter()
            steps[v]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    return {v: args.batch_size * args.seqlen / statistics.median(t) for v, t in times.items()}


def worker(args) -> dict:
    import torch

    model, tok, ids, autocast = _setup(args)
    cuda = args.device.startswith("cuda")
    step, params = _make_step(args.variant, args, model, tok, ids, autocast)
    model.train()
    loaded = _rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with _PeakRSS() as mem:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in params))
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak - loaded
    return {"variant": args.variant, "tok_s": args.batch_size * args.seqlen * args.steps / seconds,
            "s_per_step": seconds / args.steps, "peak_mib": peak / 2**20,
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS above loaded model"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--interleave", action="store_true",
                   help="also time all variants in one process, steps alternated (median tok/s; robust to load)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker subprocesses
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, *base, "--variant", variant],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
    print(f"model={args.model or 'SmolLM2-135M (embedded)'} k={args.k} batch={args.batch_size} "
          f"seqlen={args.seqlen} dtype={args.dtype} device={args.device} steps={args.steps} (+{args.warmup} warmup) "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'variant':10s} {'tok/s':>9s} {'s/step':>8s} {'peak MiB':>9s}  memory")
    for r in results.values():
        print(f"{r['variant']:10s} {r['tok_s']:9.1f} {r['s_per_step']:8.2f} {r['peak_mib']:9.0f}  {r['memory']}")
    if "ctp" in results and "peft" in results:
        c, q = results["ctp"], results["peft"]
        print(f"ctp/peft: speed x{c['tok_s'] / q['tok_s']:.2f}, memory x{c['peak_mib'] / q['peak_mib']:.2f}")
    if args.interleave:
        speed = interleaved(args)
        print("interleaved (one process, alternating steps, median): " +
              ", ".join(f"{v} {t:.1f} tok/s" for v, t in speed.items()))
        if "ctp" in speed and "peft" in speed:
            print(f"interleaved ctp/peft speed x{speed['ctp'] / speed['peft']:.2f}")


if __name__ == "__main__":
    main()
