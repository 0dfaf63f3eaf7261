"""Recompute a published prompt's recovery from the prompt file alone (an independent check of a leaderboard row).

Reads the prompt's metadata (base model, compression spec, calibration), rebuilds that compressed model with
the named calibration (through the cache), checks that the rebuild is the build the prompt was trained on
(where the prompt records it), and scores dense / compressed / compressed + prompt with the perplexity
protocol directly (`ctp_eval.eval.ppl`, not through lm-eval), then prints the share of the gap the prompt closes.

    python bench/verify_prompt.py prompts/smollm2-135m/gptq-w3g128-k100-kd.safetensors --corpus c4 --limit-windows 16
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--corpus", default="c4", help="c4, wikitext2 or ptb (test split)")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--limit-windows", type=int, default=None, help="score the first N windows only")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2 when the prompt names it)")
    args = ap.parse_args()

    from ctp_eval import models
    from ctp_eval.compress import CalibConfig, ensure_compressed
    from ctp_eval.compress.io import build_id, read_compression_info
    from ctp_eval.eval import ppl
    from ctp_eval.prompt import SoftPrompt

    prompt = SoftPrompt.load(args.prompt)
    meta = prompt.meta
    base = args.model if args.model else (None if meta.base_model == models.EMBEDDED_ID else meta.base_model)
    calib = meta.calibration or {}
    if not calib:
        raise SystemExit(f"{args.prompt} names no calibration (trained before prompts recorded it)")
    config = CalibConfig(dataset=calib["dataset"], split=calib.get("split", "train"), nsamples=calib["nsamples"],
                         seqlen=calib["seqlen"], seed=calib.get("seed", 0))
    path = ensure_compressed(base, meta.compression, calib=config)
    build, trained_on = build_id(path), meta.extra.get("compression_build")
    print(f"prompt {args.prompt}: {meta.compression}, calibration {calib}, build {build}"
          + (f" (prompt trained on build {trained_on})" if trained_on else ""))
    if trained_on and trained_on != build:
        kernels = (read_compression_info(path) or {}).get("compress_kernels", "unrecorded kernels")
        print("WARNING: the rebuilt model is not the build the prompt was trained on. Solves are deterministic "
              f"on one kernel set only (this rebuild: {kernels}); a build made on an AVX2 CPU is reproduced on an "
              "AVX-512 one with ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 (delete the cached rebuild first)")

    def score(model_path, prompt=None) -> float:
        from ctp_eval.prompt import prefix_embeds

        model, tok = models.load_model_and_tokenizer(model_path)
        prefix = prefix_embeds(model, tok, prompt.embeds, prompt.meta.layout) if prompt is not None else None
        return ppl.perplexity(model, tok, args.corpus, "test", args.seqlen, prefix, batch_size=args.batch_size,
                              limit_windows=args.limit_windows, progress=True).ppl

    dense = score(models.resolve_pretrained(base))
    compressed = score(path)
    prompted = score(path, prompt)
    gap = 100 * (compressed - prompted) / (compressed - dense) if not math.isclose(compressed, dense) else float("nan")
    print(f"{args.corpus} test, {args.seqlen}-token windows"
          + (f" (first {args.limit_windows})" if args.limit_windows else "")
          + f": dense {dense:.2f}, compressed {compressed:.2f}, with prompt {prompted:.2f}; gap closed {gap:.1f}%")


if __name__ == "__main__":
    main()
