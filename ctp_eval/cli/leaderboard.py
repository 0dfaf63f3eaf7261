"""`ctp-leaderboard`: markdown tables and plots from lm-eval results JSON."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """`ctp-leaderboard RESULTS... --out leaderboards/NAME.md`: markdown tables + plots from results JSON."""
    import argparse

    from ctp_eval.study.leaderboard import write_leaderboard

    ap = argparse.ArgumentParser(prog="ctp-leaderboard", description=main.__doc__)
    ap.add_argument("results", nargs="+", help="lm-eval results_*.json files or folders holding them (searched recursively)")
    ap.add_argument("--out", required=True, help="markdown file to write; plots are written beside it")
    ap.add_argument("--title", default=None)
    ap.add_argument("--notes", default="", help="a markdown paragraph placed under the header (e.g. the training budget)")
    ap.add_argument("--notes-file", default=None, help="read --notes from this file")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = write_leaderboard(args.results, args.out, title=args.title, plots=not args.no_plots, notes=args.notes,
                                 notes_file=args.notes_file)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ctp-leaderboard: {err}")
    print(path)
