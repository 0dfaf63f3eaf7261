"""Compression wall time and WikiText-2 token perplexity per spec, with RTN / magnitude sanity baselines.

    python bench/compress.py                                   # paper grid, 128 x 2048 C4 calibration
    python bench/compress.py --nsamples 32 --calib-seqlen 512 --limit-windows 40   # quick

Perplexity is the paper protocol (`ctp_eval.ppl.perplexity`: non-overlapping `--seqlen` windows of the
joined WikiText-2 test split). `--limit-windows` scores only the first windows, which is fine for ranking
specs but is not the full-test number; the table says how many windows were scored.

Keep calibration near the paper's (128 x 2048 tokens) when comparing GPTQ with RTN at 4 bits: with only
16 x 256 tokens, GPTQ fits the 1536-input `down_proj` Hessians to the sample (in-sample error 2x below RTN,
held-out error above it) and its 4-bit perplexity ties RTN's. `rel_err` / `rel_err_baseline` are the mean
in-sample relative layer errors of the spec and of its RTN / magnitude counterpart on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

DEFAULT_SPECS = [
    "gptq:w4g128",
    "gptq:w3g128",
    "gptq:w2g128",
    "sparsegpt:0.5",
    "sparsegpt:0.625",
    "sparsegpt:0.75",
    "sparsegpt:0.5+gptq:w4g128",
]


def main(argv=None) -> None:
    from tabulate import tabulate

    from ctp_eval.compress.apply import CompressOptions, baseline_spec, compress_model
    from ctp_eval.compress.io import CalibConfig, calibration_details, calibration_ids
    from ctp_eval.compress.spec import parse_spec
    from ctp_eval.models import load_model_and_tokenizer, model_id
    from ctp_eval.ppl import perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    ap.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="compression specs ('none' is always added)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the RTN / magnitude counterpart of each spec")
    ap.add_argument("--no-dense", action="store_true", help="skip the uncompressed row (e.g. when splitting a run)")
    ap.add_argument("--seqlen", type=int, default=1024, help="perplexity window (paper: 1024)")
    ap.add_argument("--limit-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--ppl-batch-size", type=int, default=1)
    ap.add_argument("--calib-dataset", default=CalibConfig.dataset)
    ap.add_argument("--nsamples", type=int, default=CalibConfig.nsamples)
    ap.add_argument("--calib-seqlen", type=int, default=CalibConfig.seqlen)
    ap.add_argument("--seed", type=int, default=CalibConfig.seed)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    specs = [] if args.no_dense else ["none"]
    for s in args.specs:
        spec = parse_spec(s)
        for cand in (spec, baseline_spec(spec)) if not args.no_baselines else (spec,):
            if str(cand) not in specs and not (args.no_dense and cand.is_none):
                specs.append(str(cand))

    dense, tok = load_model_and_tokenizer(args.model, device=args.device)
    calib = CalibConfig(args.calib_dataset, "train", args.nsamples, args.calib_seqlen, args.seed)
    calib_ids = None
    if any(parse_spec(s).needs_calibration for s in specs):
        calib_ids = calibration_ids(tok, calib)
    options = CompressOptions(true_sequential=args.true_sequential)
    print(f"model={model_id(args.model)} calibration={calibration_details(calib)} options={options.key()} "
          f"ppl=wikitext2-test seqlen={args.seqlen} windows={args.limit_windows or 'all'} "
          f"torch_threads={torch.get_num_threads()}", flush=True)

    rows = []
    for s in specs:
        spec = parse_spec(s)
        model = copy.deepcopy(dense)
        stats = compress_model(
            model, spec, calib_ids if spec.needs_calibration else None, options=options,
            batch_size=args.calib_batch_size, progress=False,
        )
        t0 = time.perf_counter()
        res = perplexity(model, tok, "wikitext2", "test", seqlen=args.seqlen, batch_size=args.ppl_batch_size,
                         limit_windows=args.limit_windows)
        row = {
            "spec": str(spec),
            "method": "dense" if spec.is_none else ("calibrated" if spec.needs_calibration else "baseline"),
            "compress_s": round(stats["time_s"], 1),
            "zeros": round(stats.get("zeros", 0.0), 4),
            "rel_err": stats.get("rel_err_mean"),
            "rel_err_baseline": stats.get("rel_err_baseline_mean"),
            "wikitext2_ppl": round(res.ppl, 3),
            "windows": res.n_windows,
            "ppl_s": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    print(tabulate(rows, headers="keys", floatfmt=".4g"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
