"""Wall-time cost of a soft prompt at evaluation time: `ctp` + k-token prompt vs `ctp` without vs stock `hf`.

Two lm-eval `loglikelihood_rolling` workloads (what perplexity tasks run), over WikiText-2 test:
  windows  the first --tokens tokens as one document, cut by lm-eval into --max-length (1024) windows
  docs     --docs (8) separate documents of --doc-chars (6,000) characters (~1.4k tokens each), the model's own
           max_length (each document is one window)
Variants: hf, ctp without a prompt, and ctp with a k-token prompt in each prompt mode: cache (prompt-aware
attention, the default), cache-plain (the transformers cache with an explicit (T, k+T) mask) and prepend. With an
explicit --max-length the prompted variants get max_length + k, so that all of them score the same text windows.
Runs alternate (hf, ctp, ctp+prompt, ..., hf, ...) and medians of --repeats are reported, so slow drift of a shared
machine hits every variant alike. The load average is printed before and after: quote figures from an idle machine.

    python bench/prompt_overhead.py --workload both --repeats 5          # embedded SmolLM2-135M, k=100, fp32
    python bench/prompt_overhead.py --workload docs --dtype bfloat16 --threads 2
    python bench/prompt_overhead.py --model DIR --device cuda --dtype bfloat16   # GPU (timings: .item() syncs)

Targets: ctp+prompt (cache) / ctp <= 1.05 on both workloads; ctp / hf <= 1 within noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)


def workload_requests(kind: str, tok, args):
    """(description, requests, number of tokens, max_length for hf or None for the model's own)."""
    from lm_eval.api.instance import Instance

    from ctp_eval import data

    text = data.corpus_text("wikitext2", "test")
    if kind == "windows":
        ids = tok(text, add_special_tokens=False).input_ids[: args.tokens]
        req = [Instance("loglikelihood_rolling", {}, (tok.decode(ids),), 0)]
        return f"windows: first {len(ids)} WikiText-2 test tokens, max_length {args.max_length}", req, len(ids), \
            args.max_length
    docs = [text[i * args.doc_chars : (i + 1) * args.doc_chars] for i in range(args.docs)]
    n = sum(len(tok(d, add_special_tokens=False).input_ids) for d in docs)
    req = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    return f"docs: {args.docs} WikiText-2 test chunks of {args.doc_chars} chars ({n} tokens)", req, n, None


def run_workload(kind: str, args, path: str, prompt_path: str, tok) -> dict[str, float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ctp_eval.eval.lm import CTPLM

    desc, req, n_tokens, max_length = workload_requests(kind, tok, args)
    common = dict(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if max_length is not None:
        common["max_length"] = max_length
    prompted = dict(common)
    if max_length is not None and not args.shrink_windows:
        prompted["max_length"] = max_length + args.k  # the same text windows as hf
    lms = {"hf": HFLM(pretrained=path, **common), "ctp": CTPLM(pretrained=path, **common)}
    for mode in args.modes.split(","):
        lms[f"ctp+prompt {mode}"] = CTPLM(pretrained=path, prompt=prompt_path, prompt_mode=mode, **prompted)
    warm = [Instance("loglikelihood_rolling", {}, (tok.decode(list(range(1000, 1256))),), 0)]
    for lm in lms.values():  # warm-up (allocator, kernels)
        lm.loglikelihood_rolling(warm, disable_tqdm=True)
    load_before = load()
    times: dict[str, list[float]] = {name: [] for name in lms}
    for _ in range(args.repeats):
        for name, lm in lms.items():
            t0 = time.perf_counter()
            lm.loglikelihood_rolling(req, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}  # noise only adds time: the fastest run is a second estimate

    print(f"\n== {desc}; batch {args.batch_size}, {args.dtype}, k={args.k}, {args.repeats} alternated repeats")
    print(f"load average before / after: {load_before} / {load()}")
    print(f"{'variant':24s} {'median s':>9s} {'min s':>7s} {'tok/s':>7s}  runs (s)")
    for n, m in med.items():
        print(f"{n:24s} {m:9.2f} {best[n]:7.2f} {n_tokens / m:7.0f}  " + " ".join(f"{t:.2f}" for t in times[n]))

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.3f} (min/min {best[a] / best[b]:.3f})"

    for mode in args.modes.split(","):
        target = "  (target <= 1.05)" if mode == "cache" else ""
        print(f"ratio [{kind}] ctp+prompt {mode} / ctp: {ratio(f'ctp+prompt {mode}', 'ctp')}{target}")
    print(f"ratio [{kind}] ctp / hf: {ratio('ctp', 'hf')}  (target <= 1, within noise)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF id or folder; default: embedded SmolLM2-135M")
    ap.add_argument("--workload", choices=("windows", "docs", "both"), default="both")
    ap.add_argument("--k", type=int, default=100, help="soft prompt length")
    ap.add_argument("--tokens", type=int, default=8192, help="windows: WikiText-2 test tokens to score per run")
    ap.add_argument("--max-length", type=int, default=1024, help="windows: the window given to lm-eval")
    ap.add_argument("--docs", type=int, default=8, help="docs: number of documents")
    ap.add_argument("--doc-chars", type=int, default=6000, help="docs: characters per document")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--modes", default="cache,cache-plain,prepend", help="prompt modes to time (comma-separated)")
    ap.add_argument("--shrink-windows", action="store_true",
                    help="windows: give prompted variants the same max_length (their text windows shrink by k, so "
                         "they score more, shorter windows and pad more)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ctp_eval import models
    from ctp_eval.prompt import SoftPrompt, init_from_vocab

    path = models.resolve_pretrained(args.model)
    model, tok = models.load_model_and_tokenizer(path)
    prompt_path = os.path.join(tempfile.mkdtemp(), "p.safetensors")
    SoftPrompt.for_model(init_from_vocab(model, args.k, seed=0), model, tok).save(prompt_path)
    del model
    print(f"model={models.model_id(args.model)}; machine: {machine(args.device)}")
    print(f"command: python bench/prompt_overhead.py --workload {args.workload} --repeats {args.repeats} "
          f"--batch-size {args.batch_size} --dtype {args.dtype} --device {args.device} --k {args.k} "
          f"--tokens {args.tokens} --max-length {args.max_length} --docs {args.docs} --doc-chars {args.doc_chars}"
          + (f" --threads {args.threads}" if args.threads else ""))
    for kind in (("windows", "docs") if args.workload == "both" else (args.workload,)):
        run_workload(kind, args, path, prompt_path, tok)


if __name__ == "__main__":
    main()
