"""`ctp-bench`: flags derived from `BenchConfig`, then the resumable `ctp_eval.study.bench.Runner`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from ctp_eval.cli.configargs import add_dataclass_args, config_from_args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ctp_eval.study import bench
    from ctp_eval.study.bench import BenchConfig, Runner

    ap = argparse.ArgumentParser(prog="ctp-bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, BenchConfig)
    try:
        cfg = config_from_args(BenchConfig, ap.parse_args(argv))
    except ValueError as err:
        ap.error(str(err))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "bench_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    md = Runner(cfg).all()
    if md:
        print(f"[ctp-bench] leaderboard: {md}")


if __name__ == "__main__":
    main()
