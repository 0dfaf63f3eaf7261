"""Speed and memory of ctp-train's step vs a plain PEFT PromptTuning loop (same model, k, batch, seqlen, dtype).

    python bench/train_speed.py --repeats 3                                   # SmolLM2-135M, 4 x 256, k=100, fp32+bf16
    python bench/train_speed.py --dtypes float32 --variants ctp,peft --repeats 5
    python bench/train_speed.py --model HF_ID --dtypes bfloat16 --device cuda # GPU
    python bench/train_speed.py --variants ctp,lora --dtypes float32 --json RESULTS/train-cost/train_cost.json

--json writes the medians (`ctp_eval.study.costs`) where `ctp-leaderboard` finds them: its "Soft prompt vs LoRA"
table takes the cost per training step from there.

Variants, each run in its own subprocess (neither sees the other's allocations), the runs alternated
(ctp, ctp-prepend, ..., peft, ctp, ...) --repeats times per dtype, so slow drift of a shared machine hits all alike:
  ctp          `ctp_eval.train.train_step` as ctp-train runs it: on CPU the prompt's k positions once per step,
               shared by the rows (prompt-aware attention), on a GPU prepended to every row
               (`prefix_attention.shared_prefix_pays`); chunked LM-head loss over the text positions only
  ctp-prepend  the same step with the prompt prepended to every row (shared_prefix=False; what ctp-train runs on GPUs)
  ctp-shared   the same step with the prompt shared by the rows (shared_prefix=True; ctp-train's CPU default)
  ctp-full     the default step with --loss-chunk 0 (full (B, T, V) logits)
  peft         get_peft_model(PromptTuningConfig) + `model(input_ids, labels=ids).loss` + AdamW + clipping
  lora         ctp-train's LoRA baseline step (`--method lora`: r=32, alpha=32, dropout 0.1 on q/v, the paper's),
               same data path and loss as ctp: the soft prompt's cost against LoRA's
tokens/s counts the B x T text tokens of a step (the same for all). Timed: --steps optimizer steps after --warmup
untimed ones. Memory: on CUDA, max_memory_allocated during the steps; on CPU, the peak resident set sampled every
2 ms from the loaded model until the last step, minus the RSS right after loading (the model is the same for all).
Medians over the repeats are reported, with every run, the load average before and after, and ratio lines.
--interleave adds a one-process measurement with the variants' steps alternated (speed only).

Targets: ctp / peft >= 1.5x tokens/s at the same dtype and settings, with peak memory <= 0.7x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)

from ctp_eval.study.costs import StepCost

VARIANTS = ("ctp", "ctp-prepend", "ctp-shared", "ctp-full", "peft", "lora")


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

        chunk = {"loss_chunk": 0} if variant == "ctp-full" else {} if args.loss_chunk is None else \
            {"loss_chunk": args.loss_chunk}  # default: ctp-train's own
        cfg = TrainConfig(out="-", k=args.k, seqlen=args.seqlen, batch_size=args.batch_size, steps=1000,
                          dtype=args.dtype, method="lora" if variant == "lora" else "prompt", **chunk)
        tuner = build_tuner(model, tok, cfg)
        if variant in ("ctp-prepend", "ctp-shared"):  # else ctp-train's default for this device
            tuner.shared_prefix = variant == "ctp-shared"
        opt, sched = make_optimizer(tuner, cfg)
        params = tuner.parameters()

        def step():
            train_step(tuner, opt, sched, ids, cfg.max_grad_norm, autocast)
    return step, params


def interleaved(args, variants) -> dict:
    """Speed only, all variants in one process, steps alternated (ABCABC...)."""
    import torch

    model, tok, ids, autocast = _setup(args)
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

    if args.threads:
        torch.set_num_threads(args.threads)
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
    return {"variant": args.variant, "dtype": args.dtype, "tok_s": args.batch_size * args.seqlen * args.steps / seconds,
            "s_per_step": seconds / args.steps, "peak_mib": peak / 2**20, "trainable": sum(p.numel() for p in params),
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS above loaded model"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternated subprocess runs per variant and dtype")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's choice)")
    p.add_argument("--loss-chunk", type=int, default=None, help="LM-head chunk of the ctp variants "
                   "(default: ctp-train's --loss-chunk default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--interleave", action="store_true",
                   help="also time all variants in one process, steps alternated (median tok/s)")
    p.add_argument("--json", default=None, help="also write the medians to this train_cost*.json "
                   "(under a leaderboard's results folder: its cost columns)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker subprocesses
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # set in the worker subprocesses
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    variants = args.variants.split(",")
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(dtypes) - {"float32", "bfloat16"})
    if unknown:
        p.error(f"unknown variants/dtypes {unknown}")
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(f"model={args.model or 'SmolLM2-135M (embedded)'} k={args.k} batch={args.batch_size} seqlen={args.seqlen} "
          f"device={args.device} steps={args.steps} (+{args.warmup} warmup) repeats={args.repeats} "
          f"loss_chunk={args.loss_chunk or 'ctp-train default'} "
          f"threads={args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"machine: {machine(args.device)}")
    print("command: python bench/train_speed.py " + " ".join(base))
    runs: dict[tuple[str, str], list[dict]] = {}
    started, first_load, medians = time.time(), load(), []
    for dtype in dtypes:
        load_before = load()
        for _ in range(args.repeats):
            for variant in variants:
                proc = subprocess.run([sys.executable, __file__, *base, "--variant", variant, "--dtype", dtype],
                                      capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"{variant} ({dtype}) failed:\n{proc.stderr[-3000:]}")
                runs.setdefault((dtype, variant), []).append(json.loads(lines[-1][len("RESULT "):]))
        print(f"\n== {dtype}; load average before / after: {load_before} / {load()}")
        print(f"{'variant':12s} {'trainable':>10s} {'tok/s':>8s} {'s/step':>7s} {'peak MiB':>9s}  runs tok/s | peak MiB")
        med = {}
        for variant in variants:
            rs = runs[(dtype, variant)]
            med[variant] = {key: statistics.median(r[key] for r in rs) for key in ("tok_s", "s_per_step", "peak_mib")}
            m = med[variant]
            medians.append(StepCost(variant, dtype, rs[0]["trainable"], m["tok_s"], m["s_per_step"], m["peak_mib"],
                                    [r["s_per_step"] for r in rs], [r["peak_mib"] for r in rs]))
            print(f"{variant:12s} {rs[0]['trainable']:10,d} {m['tok_s']:8.1f} {m['s_per_step']:7.2f} {m['peak_mib']:9.0f}  "
                  + " ".join(f"{r['tok_s']:.1f}" for r in rs) + " | " + " ".join(f"{r['peak_mib']:.0f}" for r in rs))
        print(f"memory: {rs[0]['memory']}")
        for variant in [v for v in variants if v != "peft"]:
            if "peft" in med:
                c, q = med[variant], med["peft"]
                target = "  (target: speed >= 1.5, memory <= 0.7)" if variant == "ctp" else ""
                print(f"ratio [{dtype}] {variant} / peft: speed x{c['tok_s'] / q['tok_s']:.2f}, "
                      f"peak memory x{c['peak_mib'] / q['peak_mib']:.2f}{target}")
        if "ctp" in med and "lora" in med:
            print(f"ratio [{dtype}] ctp / lora: speed x{med['ctp']['tok_s'] / med['lora']['tok_s']:.2f}, "
                  f"peak memory x{med['ctp']['peak_mib'] / med['lora']['peak_mib']:.2f}")
        if "ctp" in med and "ctp-prepend" in med:
            print(f"ratio [{dtype}] ctp / ctp-prepend: speed x{med['ctp']['tok_s'] / med['ctp-prepend']['tok_s']:.2f}, "
                  f"peak memory x{med['ctp']['peak_mib'] / med['ctp-prepend']['peak_mib']:.2f}")
        if args.interleave:
            args.dtype = dtype
            speed = interleaved(args, variants)
            print(f"interleaved [{dtype}] (one process, alternating steps, median): "
                  + ", ".join(f"{v} {t:.1f} tok/s" for v, t in speed.items()))
            if "ctp" in speed and "peft" in speed:
                print(f"ratio [{dtype}] interleaved ctp / peft: speed x{speed['ctp'] / speed['peft']:.2f}")
    if args.json:
        from ctp_eval.study.costs import TrainCost, save_cost

        cost = TrainCost(command="python bench/train_speed.py " + " ".join(base), machine=machine(args.device),
                         date=started, model=args.model or "SmolLM2-135M (embedded)", batch_size=args.batch_size,
                         seqlen=args.seqlen, k=args.k, steps=args.steps, repeats=args.repeats,
                         memory=runs[(dtypes[0], variants[0])][0]["memory"], load_before=first_load, load_after=load(),
                         rows=medians)
        print(f"wrote {save_cost(args.json, cost)}")


if __name__ == "__main__":
    main()
