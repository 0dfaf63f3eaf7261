"""Wall-time cost of a soft prompt at evaluation time: `ctp` + k-token prompt vs `ctp` without vs stock `hf`.

Workload: lm-eval rolling log-likelihood (what `wikitext`-style tasks run) over the first N tokens of WikiText-2
test, same max_length for all three. Runs are interleaved (hf, ctp, ctp+prompt, hf, ...) and the median of
`--repeats` is reported, so slow drift of a shared machine hits all three alike.

    python bench/prompt_overhead.py                       # embedded SmolLM2-135M, k=100, 4096 tokens
    python bench/prompt_overhead.py --tokens 8192 --max-length 1024 --dtype bfloat16

Targets (issue 2): prompt overhead <= 5 %, `ctp` without a prompt no slower than `hf`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF id or folder; default: embedded SmolLM2-135M")
    ap.add_argument("--k", type=int, default=100, help="soft prompt length")
    ap.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens to score per run")
    ap.add_argument("--max-length", type=int, default=1024, help="model window given to lm-eval")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--shrink-windows", action="store_true",
                    help="give prompted variants the same max_length (their text windows shrink by k, so they score "
                         "more, shorter windows and pad more); default: max_length + k, i.e. the same text windows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ctp_eval import data, models
    from ctp_eval.lm import CTPLM
    from ctp_eval.prompt import SoftPrompt, init_from_vocab

    path = models.resolve_pretrained(args.model)
    model, tok = models.load_model_and_tokenizer(path)
    ids = tok(data.corpus_text("wikitext2", "test"), add_special_tokens=False).input_ids[: args.tokens]
    text = tok.decode(ids)
    tmp = tempfile.mkdtemp()
    prompt_path = os.path.join(tmp, "p.safetensors")
    SoftPrompt.for_model(init_from_vocab(model, args.k, seed=0), model, tok).save(prompt_path)
    del model

    common = dict(device="cpu", dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    # By default the prompted variants score exactly the same text windows as hf (their window is k longer),
    # so the difference is the prompt's own cost, not lm-eval's window count / padding.
    prompted = dict(common, max_length=args.max_length + (0 if args.shrink_windows else args.k))
    lms = {
        "hf": HFLM(pretrained=path, **common),
        "ctp (no prompt)": CTPLM(pretrained=path, **common),
        f"ctp (k={args.k}, prefix cache)": CTPLM(pretrained=path, prompt=prompt_path, **prompted),
        f"ctp (k={args.k}, prepend)": CTPLM(pretrained=path, prompt=prompt_path, prompt_mode="prepend", **prompted),
    }
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    for lm in lms.values():  # warm-up (allocator, kernels)
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (tok.decode(ids[:256]),), 0)], disable_tqdm=True)
    times: dict[str, list[float]] = {name: [] for name in lms}
    for _ in range(args.repeats):
        for name, lm in lms.items():
            t0 = time.perf_counter()
            lm.loglikelihood_rolling(req, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)

    from tabulate import tabulate

    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["hf"]
    rows = [[n, f"{m:.2f}", f"{len(ids) / m:.0f}", f"{m / base:.3f}", " ".join(f"{t:.2f}" for t in times[n])]
            for n, m in med.items()]
    print(f"model={models.model_id(args.model)} tokens={len(ids)} max_length={args.max_length} "
          f"(prompted: {prompted['max_length']}) "
          f"batch={args.batch_size} dtype={args.dtype} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()} torch={torch.__version__}")
    print(tabulate(rows, headers=["variant", "median s", "tok/s", "vs hf", "runs (s)"]))
    no_prompt = med["ctp (no prompt)"]
    cached = med[f"ctp (k={args.k}, prefix cache)"]
    print(f"\nprompt overhead (prefix cache vs ctp without prompt): {100 * (cached / no_prompt - 1):+.1f} %  (target <= 5 %)")
    print(f"prompt overhead (prepend path vs ctp without prompt): "
          f"{100 * (med[f'ctp (k={args.k}, prepend)'] / no_prompt - 1):+.1f} %")
    print(f"ctp without prompt vs hf: {100 * (no_prompt / base - 1):+.1f} %  (target <= 0 %, within noise)")


if __name__ == "__main__":
    main()
