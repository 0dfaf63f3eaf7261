"""Console scripts, one module each: parsing and printing only; the work lives in the stage packages.

ctp-eval -> cli.eval, ctp-train -> cli.train, ctp-compress -> cli.compress, ctp-bench -> cli.bench,
ctp-leaderboard -> cli.leaderboard; `configargs` derives flags from the dataclass configs.
"""


def eval_main(argv=None) -> None:
    from ctp_eval.cli.eval import main

    main(argv)


def train_main(argv=None) -> None:
    from ctp_eval.cli.train import main

    main(argv)


def compress_main(argv=None) -> None:
    from ctp_eval.cli.compress import main

    main(argv)


def bench_main(argv=None) -> None:
    from ctp_eval.cli.bench import main

    main(argv)


def leaderboard_main(argv=None) -> None:
    from ctp_eval.cli.leaderboard import main

    main(argv)
