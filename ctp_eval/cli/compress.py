"""`ctp-compress`: compress once (cached), copy or export the result."""

from __future__ import annotations

import os


def main(argv: list[str] | None = None) -> None:
    """`ctp-compress --spec gptq:w3g128 [--model M] [--out DIR] [--export DIR]`: compress once, reuse in many runs.

    The result is cached under $CTP_CACHE_DIR/compressed (keyed by model + spec + calibration + options + dtype),
    which is where `lm_eval --model ctp --model_args compression=SPEC` looks; `--out` also copies it to a folder of
    your choice, loadable with `pretrained=DIR`. `--export DIR` also writes the deployable compressed-tensors
    form (packed integer weights, read by vLLM and transformers); `ctp-compress --from-compressed DIR --export
    DIR2` exports a checkpoint compressed earlier.
    """
    import argparse
    import logging
    import shutil

    from ctp_eval.cli.configargs import add_dataclass_args, config_from_args
    from ctp_eval.compress import (
        CalibConfig,
        CompressOptions,
        SpecError,
        ensure_compressed,
    )
    from ctp_eval.compress.export import (
        ExportError,
        export_compressed,
        spec_export_problem,
    )

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="ctp-compress", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="compression spec, e.g. gptq:w3g128, sparsegpt:0.5+gptq:w4")
    source.add_argument("--from-compressed", metavar="DIR",
                        help="a compressed checkpoint made earlier (cache entry or --out folder) to export")
    ap.add_argument("--model", default=None, help="HF id or folder; default: embedded SmolLM2-135M")
    ap.add_argument("--out", default=None, help="also copy the compressed checkpoint to this folder")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="also write the compressed-tensors export (pack-quantized) to this new folder")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip reloading the export through transformers (the packed codes are still checked "
                         "against the grid, bit for bit)")
    ap.add_argument("--device", default="auto",
                    help="where each block is solved (auto: cuda if available, else cpu; cuda:1, ...); the model "
                         "itself stays on the host and its blocks visit the device one at a time")
    ap.add_argument("--dtype", default="auto",
                    help="dtype of the weights while compressing and on disk (auto: the checkpoint's own, e.g. "
                         "bfloat16); part of the cache key. Hessians and solves are float32 regardless")
    ap.add_argument("--activations-on-host", action="store_true",
                    help="keep the calibration activations on the host instead of the device (less device memory)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for Hessians and solves (default: all that torch uses; env CTP_COMPRESS_THREADS)")
    calib = ap.add_argument_group("calibration")
    add_dataclass_args(calib, CalibConfig)
    solver = ap.add_argument_group("solver")
    add_dataclass_args(solver, CompressOptions)
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.from_compressed and not args.export:
        ap.error("--from-compressed needs --export DIR")
    if args.from_compressed and (args.model or args.out):
        ap.error("--from-compressed takes no --model/--out: the checkpoint already is the compressed model")
    for folder in (args.out, args.export):
        if folder and os.path.exists(folder):
            raise SystemExit(f"ctp-compress: {folder} exists; choose a new folder")
    if args.spec:
        try:
            problem = spec_export_problem(args.spec) if args.export else None
            if problem:  # refuse before spending the compression time
                raise SystemExit(f"ctp-compress: cannot export: {problem}")
            path = ensure_compressed(args.model, args.spec, calib=config_from_args(CalibConfig, args),
                                     options=config_from_args(CompressOptions, args), device=args.device,
                                     dtype=args.dtype, activations_on_host=args.activations_on_host,
                                     threads=args.threads)
        except (SpecError, ValueError, FileNotFoundError) as err:
            raise SystemExit(f"ctp-compress: {err}")
        if args.out:
            shutil.copytree(path, args.out)
            path = args.out
        print(path)
    else:
        path = args.from_compressed
    if args.export:
        try:
            export_compressed(path, args.export, verify=not args.no_verify)  # logs the on-disk sizes
        except ExportError as err:
            raise SystemExit(f"ctp-compress: cannot export: {err}")
        print(args.export)
