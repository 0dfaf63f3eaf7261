"""`ctp-eval`: the stock lm-eval CLI with `ctp` registered and `--model ctp` as the default model."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
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


if __name__ == "__main__":
    main()
