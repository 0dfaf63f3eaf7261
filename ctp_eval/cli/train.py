"""`ctp-train`: flags derived from `TrainConfig`, then `ctp_eval.train.loop.train`."""

from __future__ import annotations

import logging
import os
import signal
import sys

from ctp_eval.train.config import TrainConfig, TrainError, TrainingDiverged


def build_parser():
    import argparse

    from ctp_eval.cli.configargs import add_dataclass_args

    parser = argparse.ArgumentParser(
        prog="ctp-train", description="Learn a soft prompt (or LoRA baseline) for a (compressed) causal LM.",
        epilog="Multi-GPU: accelerate launch --multi_gpu --num_processes N -m ctp_eval.train --out DIR ... "
               "(--batch-size is per process). Interrupt with Ctrl-C/SIGTERM and continue with --resume.")
    add_dataclass_args(parser, TrainConfig, required=("out",))
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI entry: parse, train, print a summary. Exits 2 on bad flags/data, 3 on divergence, 128+signal."""
    from ctp_eval.cli.configargs import config_from_args
    from ctp_eval.data import DataUnavailableError
    from ctp_eval.prompt import PromptError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(TrainConfig, args)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from ctp_eval.train.loop import train

        result = train(cfg)
    except TrainingDiverged as err:
        print(f"ctp-train: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except (TrainError, DataUnavailableError, PromptError, FileNotFoundError) as err:
        print(f"ctp-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: one summary, from rank 0
        return
    print(f"val ppl {result.val_ppl_before:.4f} -> {result.best_val_ppl:.4f} (best at step {result.best_step}); "
          f"{result.steps_done} steps, {result.tokens_per_s:.1f} tok/s, {result.trainable_params} trainable params")
    print(f"best: {result.artifact}")
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        raise SystemExit(128 + int(signal.Signals[result.stopped_by]))


if __name__ == "__main__":
    main()
