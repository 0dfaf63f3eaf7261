"""Our GPTQ / SparseGPT against llm-compressor 0.14's on the same model and the same calibration tokens:
compression wall time and WikiText-2 token perplexity of both results.

    python bench/vs_llmcompressor.py                # gptq:w4 and sparsegpt:0.5 on SmolLM2-135M, 3 repeats, all windows
    python bench/vs_llmcompressor.py --specs gptq:w4 --repeats 1 --limit-windows 40 --threads 2     # quick

Target: our wall <= 1.0x llm-compressor's at equal or better perplexity.

How it runs:
* llm-compressor lives in its own venv (`--llmc-venv`, default ~/.cache/ctp_eval/bench-llmcompressor-venv),
  made on first use: `python -m venv`, `pip install torch==2.13.0` first (the local CPU wheel; a looser pin
  pulls a multi-GB CUDA build), then `pip install "llmcompressor==0.14.*"`. It is reused while it imports
  llmcompressor. Its package versions are printed.
* Here the model is loaded in fp32 and saved to a temporary plain HF folder (safetensors + tokenizer), and the
  calibration ids are drawn once with `calibration_ids` (C4 train, `--nsamples` x `--calib-seqlen`, `--seed`)
  and saved, so both tools see exactly the same tokens in the same batches (`--calib-batch-size`).
* llm-compressor: `bench/llmcompressor_worker.py` in the other venv loads the folder and runs `oneshot`
  (sequential pipeline: layer by layer, errors propagated, as ours) with GPTQModifier or SparseGPTModifier,
  lm_head ignored; only `oneshot` is timed. It saves the result as a plain dense fp32 folder, which is loaded
  here. Settings that llm-compressor cannot match are printed; a spec it cannot express is skipped, saying why.
* Ours: `compress_model` on a fresh copy of the model in this process, timed the same way (compression
  only; the copy is not timed). Both sides use the same torch thread count (`--threads`).
* Runs alternate (ours, llm-compressor; the next repeat starts with llm-compressor) and the median wall of
  `--repeats` is reported. Perplexity is `ctp_eval.ppl.perplexity` (WikiText-2 test, 1024-token windows,
  `--limit-windows` for the first N only) of the first run of each tool; later runs are checked to give the
  same weights. The dense model is scored once. The load average is printed before and after: quote figures
  from an idle machine only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from benchutil import (  # bench/benchutil.py: run as python bench/<script>.py
    load,
    machine,
)

DEFAULT_SPECS = "gptq:w4,sparsegpt:0.5"
DEFAULT_VENV = "~/.cache/ctp_eval/bench-llmcompressor-venv"
TORCH_PIN = "torch==2.13.0"
LLMC_PIN = "llmcompressor==0.14.*"
WORKER = Path(__file__).resolve().with_name("llmcompressor_worker.py")
TOOLS = ("ours", "llm-compressor")


# ----------------------------------------------------------------------------- the llm-compressor venv


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _worker_env() -> dict:
    """The environment of a process in the other venv: none of ours leaks in, no hub access."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def ensure_venv(venv: Path) -> dict:
    """Make the llm-compressor venv unless it already imports llmcompressor; return its package versions."""
    py = _venv_python(venv)
    ok = py.is_file() and subprocess.run([str(py), "-c", "import llmcompressor"], env=_worker_env(),
                                         capture_output=True).returncode == 0
    if not ok:
        print(f"making the llm-compressor venv at {venv} (once; a few minutes)", flush=True)
        t0 = time.perf_counter()
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "-q", TORCH_PIN],  # first: the local CPU wheel
            [str(py), "-m", "pip", "install", "-q", LLMC_PIN],  # torch is then already satisfied
        ]
        for cmd in steps:
            if subprocess.run(cmd, env=_worker_env()).returncode != 0:
                raise SystemExit(f"failed: {shlex.join(cmd)} (remove {venv} and retry, or pass --llmc-venv)")
        print(f"llm-compressor venv ready in {time.perf_counter() - t0:.0f} s", flush=True)
    out = subprocess.run([str(py), str(WORKER), "--versions"], env=_worker_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{py} cannot run the worker:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- spec -> llm-compressor settings


def llmc_settings(spec, in_features: set[int], options) -> tuple[dict | None, list[str]]:
    """(worker config, notes) for a parsed spec; config None means llm-compressor cannot run it (notes: why).

    Notes on a runnable spec list the settings that differ between the two implementations.
    """
    common = {"damp": options.damp, "blocksize": options.blocksize}
    notes = ["Hessian inverse factorized in fp32 (ours: fp64)",
             "calibration forwards in eager attention (ours: the model's own attention implementation)"]
    q, s = spec.quant, spec.sparse
    if spec.is_none:
        return None, ["dense: nothing to compress"]
    if q is not None and s is not None:
        return None, ["joint sparse+quant: ours solves both in one OBS sweep, llm-compressor runs two modifiers "
                      "one after the other; not the same method"]
    if q is not None:
        if q.method != "gptq":
            return None, [f"{q.method} is a calibration-free baseline; this bench compares gptq and sparsegpt"]
        bad = sorted(w for w in in_features if q.group_size and w >= q.group_size and w % q.group_size)
        if bad:
            return None, [f"group size {q.group_size} does not divide input widths {bad}: llm-compressor 0.14 "
                          "refuses such layers (ours gives the last group fewer columns)"]
        if q.act_order and q.group_size:
            return None, ["grouped act-order: ours fits each grid on a group of permuted columns (the 'group' "
                          "order llm-compressor removed), llm-compressor 0.14's 'weight' order keeps the "
                          "original column groups"]
        return {"method": "gptq", "bits": q.bits, "group_size": q.group_size, "sym": q.sym,
                "actorder": "weight" if q.act_order else None, **common}, notes
    if s.method != "sparsegpt":
        return None, [f"{s.method} is a calibration-free baseline; this bench compares gptq and sparsegpt"]
    if not s.structured:
        notes.append(f"unstructured mask per {options.blocksize}-column block thresholds with <= at sorted index "
                     "int(sparsity * block size) (ties and one extra weight per block may go; ours prunes exactly "
                     "round(sparsity * numel) per layer)")
    return {"method": "sparsegpt", "sparsity": s.sparsity,
            "mask_structure": f"{s.n}:{s.m}" if s.structured else "0:0", **common}, notes


def describe(cfg: dict) -> str:
    if cfg["method"] == "gptq":
        grid = f"group {cfg['group_size']}" if cfg["group_size"] else "per output channel"
        return (f"GPTQModifier: int{cfg['bits']} weight-only, {'symmetric' if cfg['sym'] else 'asymmetric'}, "
                f"{grid}, min-max observer, actorder={cfg['actorder']}, dampening_frac={cfg['damp']}, "
                f"block_size={cfg['blocksize']}, ignore=['re:.*lm_head']")
    return (f"SparseGPTModifier: sparsity={cfg['sparsity']}, mask_structure={cfg['mask_structure']!r}, "
            f"dampening_frac={cfg['damp']}, block_size={cfg['blocksize']}, ignore=['re:.*lm_head']")


# ----------------------------------------------------------------------------- one run of each tool


def run_llmc(venv: Path, cfg: dict, work: Path, tag: str) -> tuple[Path, dict]:
    """One worker process: (folder of the dense compressed model, its result JSON)."""
    out_dir, result = work / f"llmc-{tag}", work / f"llmc-{tag}.json"
    shutil.rmtree(out_dir, ignore_errors=True)
    conf = work / f"llmc-{tag}-config.json"
    conf.write_text(json.dumps({**cfg, "out_dir": str(out_dir), "result": str(result)}, indent=1))
    log = work / f"llmc-{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.run([str(_venv_python(venv)), str(WORKER), str(conf)], env=_worker_env(), stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"llm-compressor worker failed ({proc.returncode}); log {log}:\n{tail}")
    return out_dir, json.loads(result.read_text())


def compressed_weights(model) -> dict[str, torch.Tensor]:
    """The Linear weights of the decoder blocks (what either tool changes), as a name -> tensor copy."""
    from ctp_eval.compress.apply import block_linears, find_blocks

    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}.weight": lin.weight.detach().clone()
            for i, b in enumerate(blocks) for n, lin in block_linears(b).items()}


def changed_outside(model, dense, inside: dict) -> list[str]:
    """Names of the weights outside the decoder-block Linears (`inside`) that differ from the dense model's:
    neither tool may touch them (embeddings, norms, LM head)."""
    ref = dense.state_dict()
    return [k for k, v in model.state_dict().items() if k not in inside and not torch.equal(v, ref[k])]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def zero_fraction(w: dict) -> float:
    return sum(int((t == 0).sum()) for t in w.values()) / sum(t.numel() for t in w.values())


@dataclass
class Run:
    """What every compression run of a comparison shares."""

    dense: torch.nn.Module  # the fp32 model; each of our runs compresses a deep copy
    calib_ids: torch.Tensor  # (nsamples, seqlen), the tokens the worker reads from its safetensors copy
    options: object  # CompressOptions
    batch_size: int
    threads: int
    repeats: int
    venv: Path
    work: Path
    score: Callable  # model -> (WikiText-2 PPL, windows scored)


def run_ours(spec, run: Run):
    """(compressed model, wall s): `compress_model` on a fresh copy, the copy not timed."""
    from ctp_eval.compress.apply import compress_model

    model = copy.deepcopy(run.dense)
    t0 = time.perf_counter()
    compress_model(model, spec, run.calib_ids, options=run.options, batch_size=run.batch_size, progress=False,
                   threads=run.threads)
    return model, time.perf_counter() - t0


def compare_spec(spec, cfg: dict, notes: list[str], run: Run) -> tuple[list[list[str]], str]:
    """Alternated runs of both tools on one spec: prints each run, returns (table rows, ratio line)."""
    from transformers import AutoModelForCausalLM

    print(f"\n== [{spec}] llm-compressor {describe(cfg)}")
    for n in notes:
        print(f"   differs from ours: {n}")
    walls: dict = {t: [] for t in TOOLS}
    first: dict = {}  # tool -> weights of its first run
    drift = {t: 0.0 for t in TOOLS}  # largest weight difference of a later run from the first
    ppl: dict = {}
    zeros: dict = {}
    load_before = load()
    for r in range(run.repeats):
        for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
            if tool == "ours":
                model, wall = run_ours(spec, run)
            else:
                out_dir, res = run_llmc(run.venv, cfg, run.work, f"{str(spec).replace(':', '-')}-{r}")
                wall = res["wall_s"]
                if res.get("max_off_grid") is not None and r == 0:
                    print(f"   llm-compressor weights off their grid by at most {res['max_off_grid']:.3g}")
                model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
                shutil.rmtree(out_dir)
            walls[tool].append(wall)
            w = compressed_weights(model)
            outside = changed_outside(model, run.dense, w)
            if outside:
                raise SystemExit(f"{tool} [{spec}] changed weights outside the decoder Linears: {outside[:5]}")
            if tool not in first:
                first[tool], zeros[tool] = w, zero_fraction(w)
                ppl[tool], _ = run.score(model)
            else:
                drift[tool] = max(drift[tool], max_diff(first[tool], w))
            print(f"   run {r + 1} {tool}: {wall:.2f} s" + (f", PPL {ppl[tool]:.3f}" if len(walls[tool]) == 1 else ""),
                  flush=True)
            del model
    a, b = first["ours"], first["llm-compressor"]
    n = sum(t.numel() for t in a.values())
    print(f"   ours vs llm-compressor weights: max |diff| {max_diff(a, b):.3g}, "
          f"{sum(int((a[k] != b[k]).sum()) for k in a) / n:.4f} of them differ, zero in one only: "
          f"{sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a) / n:.4f}")
    print(f"   load average before / after: {load_before} / {load()}")
    if run.repeats > 1:
        for t in TOOLS:
            print(f"   {t}: later runs' weights differ from the first by at most {drift[t]:.3g}"
                  + (" (deterministic)" if drift[t] == 0 else ""))
    med = {t: statistics.median(walls[t]) for t in TOOLS}
    rows = [[str(spec), t, f"{med[t]:.2f} ({', '.join(f'{x:.2f}' for x in walls[t])})", f"{zeros[t]:.4f}",
             f"{ppl[t]:.3f}"] for t in TOOLS]
    ratio = (f"ratio [{spec}] ours / llm-compressor wall: {med['ours'] / med['llm-compressor']:.2f} (target <= 1.0); "
             f"PPL ours {ppl['ours']:.3f} vs llm-compressor {ppl['llm-compressor']:.3f}")
    return rows, ratio


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    import transformers
    from safetensors.torch import save_file

    from ctp_eval.compress.apply import CompressOptions, block_linears, find_blocks
    from ctp_eval.compress.io import CalibConfig, calibration_details, calibration_ids
    from ctp_eval.compress.spec import parse_spec
    from ctp_eval.eval.ppl import perplexity
    from ctp_eval.models import load_model_and_tokenizer, model_id, resolve_pretrained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="comma-separated specs (gptq:... and sparsegpt:... only)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated compression runs per tool; median wall")
    ap.add_argument("--limit-windows", type=int, default=None, help="score only the first N WikiText-2 windows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--llmc-venv", default=DEFAULT_VENV, help="llm-compressor venv (made on first use)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seed", type=int, default=0,
                    help="calibration sample seed (GPTQ/SparseGPT results move with it: compare over several)")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--calib-batch-size", type=int, default=8, help="calibration batch size, both tools")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (models, logs)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    transformers.logging.disable_progress_bar()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    venv = Path(os.path.expanduser(args.llmc_venv))

    print("command: python bench/vs_llmcompressor.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {machine()}")
    print(f"load average before: {load()}", flush=True)
    versions = ensure_venv(venv)
    print("llm-compressor venv: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)

    options = CompressOptions()
    path = resolve_pretrained(args.model)
    dense, tok = load_model_and_tokenizer(path)  # fp32
    in_features = {lin.in_features for b in find_blocks(dense)[1] for lin in block_linears(b).values()}
    specs = []
    for text in filter(None, (x.strip() for x in args.specs.split(","))):
        spec = parse_spec(text)
        cfg, notes = llmc_settings(spec, in_features, options)
        if cfg is None:
            print(f"skip [{spec}]: llm-compressor cannot run it like ours: {notes[0]}")
            continue
        specs.append((spec, cfg, notes))
    if not specs:
        raise SystemExit("no spec left to compare")

    work = Path(tempfile.mkdtemp(prefix="ctp-vs-llmc-"))
    try:
        model_dir = work / "model"
        dense.save_pretrained(model_dir, safe_serialization=True)  # fp32, plain HF folder
        tok.save_pretrained(model_dir)
        calib = CalibConfig("c4", "train", args.nsamples, args.calib_seqlen, args.seed)
        calib_ids = calibration_ids(tok, calib)  # (nsamples, seqlen)
        save_file({"input_ids": calib_ids.contiguous()}, str(work / "calib.safetensors"))
        print(f"model={model_id(args.model)} calibration={calibration_details(calib)} batch={args.calib_batch_size} "
              f"ppl=wikitext2-test seqlen 1024 windows={args.limit_windows or 'all'} torch_threads={threads} "
              f"work={work}", flush=True)
        base = {"model_dir": str(model_dir), "calib": str(work / "calib.safetensors"), "threads": threads,
                "batch_size": args.calib_batch_size}

        def score(model) -> tuple[float, int]:
            res = perplexity(model, tok, "wikitext2", "test", limit_windows=args.limit_windows)
            return res.ppl, res.n_windows

        run = Run(dense, calib_ids, options, args.calib_batch_size, threads, args.repeats, venv, work, score)
        dense_ppl, n_windows = score(dense)
        print(f"dense: WikiText-2 PPL {dense_ppl:.3f} ({n_windows} windows)", flush=True)

        rows, ratios = [], []
        for spec, cfg, notes in specs:
            spec_rows, ratio = compare_spec(spec, {**base, **cfg}, notes, run)
            rows += spec_rows
            ratios.append(ratio)

        print(f"\n{machine()}; llm-compressor {versions['llmcompressor']}, compressed-tensors "
              f"{versions['compressed-tensors']}, transformers {versions['transformers']} (ours: "
              f"{transformers.__version__}), torch {versions['torch']}; WikiText-2 test, "
              f"{n_windows} windows of 1024 tokens; calibration {args.nsamples} x {args.calib_seqlen} C4-train "
              "tokens\n")
        print("| spec | tool | compress s (median, runs) | zeros | WikiText-2 PPL |")
        print("|---|---|---|---|---|")
        print(f"| none | dense | 0 | | {dense_ppl:.3f} |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
        for line in ratios:
            print(line)
        print(f"load average after: {load()}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
