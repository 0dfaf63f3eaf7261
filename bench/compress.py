"""Compression wall time and WikiText-2 token perplexity per spec, with RTN / magnitude sanity baselines.

    python bench/compress.py                                   # paper grid, 128 x 2048 C4 calibration
    python bench/compress.py --nsamples 32 --calib-seqlen 512 --limit-windows 40   # quick
    python bench/compress.py --scale --nsamples 8 --calib-seqlen 512 --export     # 7B-sized blocks (heavy, not CI)

`--scale` (see `scale_main`) compresses a random Llama with 7B-sized blocks through `ctp-compress` in child
processes, once per `--threads-list` entry, and reports each one's peak RSS against the estimate from the model.
With `--export` it also exports the first run's checkpoint and reports the export's peak RSS over the model's
size in its dtype. For the export alone, a calibration-free spec is quick:

    python bench/compress.py --scale --scale-layers 2 --scale-spec rtn:w4g128 --threads-list 1 --export

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
from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)

from ctp_eval import presets

DEFAULT_SPECS = list(presets.GROUPED_SPECS)


def main(argv=None) -> None:
    from tabulate import tabulate

    from ctp_eval.compress.apply import CompressOptions, baseline_spec, compress_model
    from ctp_eval.compress.io import CalibConfig, calibration_details, calibration_ids
    from ctp_eval.compress.spec import parse_spec
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.models import load_model_and_tokenizer, model_id

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
    scale = ap.add_argument_group("--scale: peak memory and threads on 7B-sized blocks")
    scale.add_argument("--scale", action="store_true", help="run the scale benchmark instead of the spec grid")
    scale.add_argument("--scale-dir", default="/tmp/ctp-scale", help="work folder (model, caches, exports)")
    scale.add_argument("--scale-layers", type=int, default=4, help="decoder blocks (7B has 32)")
    scale.add_argument("--scale-spec", default="gptq:w4g128")
    scale.add_argument("--dtype", default="bfloat16", help="dtype the random model is saved and compressed in")
    scale.add_argument("--threads-list", default="all,1", help="comma-separated thread counts; 'all' = torch's default")
    scale.add_argument("--export", action="store_true",
                       help="also run ctp-compress --export: time, size, and peak RSS against the model's size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.scale:
        return scale_main(args)

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


# ----------------------------------------------------------------------------- --scale

# Llama-2-7B's block shape; the block count is --scale-layers. The vocabulary is the tokenizer's.
SCALE_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)

# Runs `ctp-compress` in a child process and reports its own peak RSS (ru_maxrss: the high-water mark, not a
# sample) and its RSS once torch / transformers / ctp_eval are imported, before any model exists. Linux carries
# ru_maxrss over fork + exec, so a child of a parent that just built the model starts at the parent's size;
# /proc/self/status VmHWM belongs to the new process image alone (the export columns use it).
_WORKER = """
import json, resource, sys, time
import torch, transformers
from ctp_eval.cli import compress_main
from ctp_eval.compress import apply, export, io
def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
base, base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, hwm()
t0 = time.perf_counter()
compress_main(sys.argv[1:])
print("SCALE_RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "base_rss": base,
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "torch_threads": torch.get_num_threads(),
      "base_hwm": base_hwm, "peak_hwm": hwm()}))
"""


def _scale_model_dir(root, layers: int, dtype):
    """A random Llama with 7B-sized blocks saved in `dtype` with the embedded SmolLM2 tokenizer (reused if there)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from ctp_eval.models import resolve_pretrained

    path = Path(root) / f"llama7b-blocks{layers}-{str(dtype).replace('torch.', '')}"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(None))
    cfg = LlamaConfig(**SCALE_SHAPE, num_hidden_layers=layers, vocab_size=len(tok), max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def scale_estimate(model_dir, nsamples: int, seqlen: int) -> dict:
    """Bytes the issue's estimate counts, derived from the saved config on the meta device (no weights):
    the model in its dtype (host), and one block in fp32 + its Hessians + the calibration activations (device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ctp_eval.compress.apply import block_linears, find_blocks
    from ctp_eval.models import resolve_dtype

    cfg = AutoConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(str(model_dir), "auto")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _, blocks = find_blocks(model)
    item = torch.empty((), dtype=dtype).element_size()
    return {
        "model": sum(p.numel() for p in model.parameters()) * item,
        "block_fp32": sum(p.numel() for p in blocks[0].parameters()) * 4,
        "hessians": sum(lin.in_features**2 * 4 for lin in block_linears(blocks[0]).values()),
        "activations": nsamples * seqlen * cfg.hidden_size * item,
    }


def _run_child(cmd: list[str], env: dict, log) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WORKER, *cmd], env=env, stdout=subprocess.PIPE,
                          stderr=log, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scale: child failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SCALE_RESULT "))
    return json.loads(line.split(" ", 1)[1])


def _folder_bytes(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def scale_main(args) -> None:
    """Compress the 7B-block model once per thread count; print peak RSS vs estimate, wall time and sizes."""
    import os
    import shutil
    from pathlib import Path

    from tabulate import tabulate

    from ctp_eval.models import resolve_dtype

    gib = 2**30
    root = Path(args.scale_dir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = _scale_model_dir(root, args.scale_layers, resolve_dtype(None, args.dtype))
    est = scale_estimate(model_dir, args.nsamples, args.calib_seqlen)
    rows, log = [], open(root / "scale.log", "a")
    print(f"{machine()}; model {model_dir} ({_folder_bytes(model_dir) / gib:.2f} GiB on disk), spec {args.scale_spec}, "
          f"calibration {args.nsamples} x {args.calib_seqlen}, estimate parts (GiB): "
          + ", ".join(f"{k} {v / gib:.2f}" for k, v in est.items()), flush=True)
    for threads in args.threads_list.split(","):
        cache = root / f"cache-threads-{threads}"
        shutil.rmtree(cache, ignore_errors=True)  # a cold cache: every run compresses
        env = {**os.environ, "CTP_CACHE_DIR": str(cache)}
        cmd = ["--spec", args.scale_spec, "--model", str(model_dir), "--device", "cpu", "--dtype", "auto",
               "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen)]
        cmd += [] if threads == "all" else ["--threads", threads]
        load_before = load()
        res = _run_child(cmd, env, log)
        out = next((cache / "compressed").iterdir())
        info = json.loads((out / "ctp_compression.json").read_text())
        estimate = res["base_rss"] + sum(est.values())
        row = {"threads": threads if threads != "all" else f"all ({res['torch_threads']})", "wall_s": round(res["wall_s"], 1),
               "compress_s": round(info["stats"]["time_s"], 1), "rel_err": info["stats"].get("rel_err_mean"),
               "rel_err_rtn": info["stats"].get("rel_err_baseline_mean"),
               "peak_rss_gib": round(res["peak_rss"] / gib, 2), "estimate_gib": round(estimate / gib, 2),
               "ratio": round(res["peak_rss"] / estimate, 2), "runtime_rss_gib": round(res["base_rss"] / gib, 2),
               "checkpoint_gib": round(_folder_bytes(out) / gib, 2), "load_before": load_before,
               "load_after": load()}
        if args.export and threads == args.threads_list.split(",")[0]:
            dest = root / "export"
            shutil.rmtree(dest, ignore_errors=True)
            exp = _run_child(["--from-compressed", str(out), "--export", str(dest)], env, log)
            # The export streams, so its peak is measured against the model in its dtype (target <= 1.5x);
            # the runtime (torch, transformers, ctp_eval imported) is counted in the peak and reported apart.
            record = json.loads((dest / "ctp_compression.json").read_text())["export"]
            row.update(export_gib=round(_folder_bytes(dest) / gib, 2), export_s=round(exp["wall_s"], 1),
                       export_peak_rss_gib=round(exp["peak_hwm"] / gib, 2),
                       export_runtime_rss_gib=round(exp["base_hwm"] / gib, 2),
                       export_peak_over_model=round(exp["peak_hwm"] / est["model"], 2),
                       export_verified_by="+".join(record.get("verified_by", [])) or "no")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".4g"), flush=True)
    print(f"load {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": str(model_dir), "estimate_parts": est, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
