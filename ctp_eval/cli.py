"""Console entry points. Parsing and printing only; the work lives in the library modules."""

from __future__ import annotations

import sys


def eval_main(argv: list[str] | None = None) -> None:
    """`ctp-eval ...`: the stock lm-eval CLI with `ctp` registered and `--model ctp` as the default model.

    Everything after `ctp-eval` is lm-eval's own syntax (`ctp-eval --tasks ctp_paper --model_args prompt=p.safetensors`).
    Our task folder is always searched, so `--include_path` is never needed for the `ctp_*` tasks.
    """
    from ctp_eval import _hook

    _hook.install()  # idempotent; covers installs where the .pth hook was not run (e.g. PYTHONNOUSERSITE tricks)
    args = list(sys.argv[1:] if argv is None else argv)
    subcommands = {"run", "ls", "validate"}
    run_mode = not args or args[0] not in subcommands or args[0] == "run"
    if run_mode and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "ctp", *args]
    if args and args[0] not in subcommands and not any(a in ("-h", "--help") for a in args[:1]):
        args = ["run", *args]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["ctp-eval", *args]
    cli_evaluate()


def train_main(argv: list[str] | None = None) -> None:
    """`ctp-train ...`: learn a soft prompt (or a LoRA baseline) on a (compressed) model."""
    from ctp_eval.train import main

    main(argv)


def leaderboard_main(argv: list[str] | None = None) -> None:
    """`ctp-leaderboard RESULTS... --out leaderboards/NAME.md`: markdown tables + plots from results JSON."""
    import argparse

    from ctp_eval.leaderboard import write_leaderboard

    ap = argparse.ArgumentParser(prog="ctp-leaderboard", description=leaderboard_main.__doc__)
    ap.add_argument("results", nargs="+", help="lm-eval results_*.json files or folders holding them (searched recursively)")
    ap.add_argument("--out", required=True, help="markdown file to write; plots are written beside it")
    ap.add_argument("--title", default=None)
    ap.add_argument("--notes", default="", help="a markdown paragraph placed under the header (e.g. the training budget)")
    ap.add_argument("--notes-file", default=None, help="read --notes from this file")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    notes = args.notes
    if args.notes_file:
        with open(args.notes_file) as f:
            notes = f.read()
    try:
        path = write_leaderboard(args.results, args.out, title=args.title, plots=not args.no_plots, notes=notes)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ctp-leaderboard: {err}")
    print(path)


if __name__ == "__main__":
    eval_main()
