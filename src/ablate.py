"""Summarize a Hydra sweep: ``difflab-ablate <multirun dir> [--metrics M ...] [--baseline 'process=vp'] [--step N]
[--out DIR]`` (``python ablate.py ...`` in a checkout).

For a sweep such as ``python train.py -m process=vp,edm,flow seed=0,1,2`` it groups the jobs into arms (every swept
value but the seed), gives each metric's mean, sd and 95% Student-t interval per arm, marks the best arm, and
compares every arm with a baseline arm seed by seed (paired t; Welch's t when seeds do not match). It names the grid
points with no job and the jobs that have not finished. Writes ``summary.md``, ``summary.csv``, ``differences.csv``
and one ``<metric>.png`` per metric into ``<sweep>/ablation/`` (or ``--out``), and prints summary.md.

This module imports nothing heavy at import time, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.utils.cli import run_reporting_errors

OUT_SUBDIR = "ablation"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="difflab-ablate",
        description="Summarize a Hydra multirun sweep: per-arm means with 95% t intervals over seeds, the best arm, "
        "and paired differences against a baseline arm.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory printed by `python train.py -m ...`")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="M",
        help="metrics to summarize (default: val/loss and every metrics/* column but floors)",
    )
    parser.add_argument(
        "--baseline",
        metavar="ARM",
        help="the arm to compare against, e.g. 'process=vp' (default: the first arm of the sweep)",
    )
    parser.add_argument(
        "--step", type=int, metavar="N", help="use the values logged at step N (default: each job's last logged value)"
    )
    parser.add_argument(
        "--detect",
        metavar="D",
        help="the difference to size the sweep for: seeds per arm that would detect it with 80%% "
        "power, in the metric's units (3.7) or as a share of the baseline's mean (5%%); default: "
        "the observed difference",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default: <sweep>/{OUT_SUBDIR})")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="read the sweep and check the arguments, print what the summary would hold, write nothing",
    )
    return parser


def ablate(args: argparse.Namespace) -> list[Path]:
    """Read the sweep, compute the summary, write the outputs and print summary.md; returns the files written."""
    from difflab.ablation.summary import Detect, build_report, render_markdown, write_report
    from difflab.ablation.sweep import read_sweep
    from difflab.trust import not_a_link

    sweep = read_sweep(args.sweep_dir)
    out = args.out if args.out is not None else not_a_link(sweep.path / OUT_SUBDIR, "remove it or pass --out DIR")
    detect = Detect.parse(args.detect) if args.detect else None
    report = build_report(sweep, metrics=args.metrics, baseline=args.baseline, step=args.step, detect=detect)
    if args.validate:
        from difflab.ablation.summary import header_lines

        print("\n".join(header_lines(report)))
        print(f"metrics: {', '.join(report.metrics)}; baseline: {report.baseline.label}")
        print(f"nothing was written (--validate); the summary would go to {out}")
        return []
    markdown = render_markdown(report)
    written = write_report(report, out, markdown)
    print(markdown, end="")
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input is one ``error:`` line on stderr and exit status 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_reporting_errors(ablate, args)


if __name__ == "__main__":
    main()
