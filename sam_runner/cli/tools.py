"""`sam-measure`, `sam-landscape`, `sam-report`: the tools that read run directories after the fact (report/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sam_runner.cli.messages import EXIT_USAGE, one_line_errors, warnings_in_one_line


def measure_main(argv: list[str] | None = None) -> None:
    """`sam-measure RUN_DIR`: measure the sharpness of a saved checkpoint without retraining."""
    parser = argparse.ArgumentParser(prog="sam-measure", description=measure_main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory written by sam-run (holds run.json and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to measure (default: RUN_DIR/checkpoints/last.pt)")
    parser.add_argument("--measures", help="comma-separated measure names, or `auto` (default: the run's setting)")
    parser.add_argument("--rho", type=float, help="sharpness radius (default: the run's sharpness.rho)")
    parser.add_argument("--num-samples", type=int, help="training samples to measure on (default: the run's setting)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to measure (default: the run's device)")
    args = parser.parse_args(argv)
    # the summary is written only once a measurement is complete: a stop before leaves nothing to undo, and from then
    # on stops are ignored (the measurement is recorded whole, and the command says so)
    with one_line_errors("sam-measure", interrupted="nothing was added to the run's summary.json") as importing:
        with importing():  # torch: seconds
            from sam_runner.report.remeasure import measure_checkpoint
            from sam_runner.run.stopping import ignore_stops
        result = measure_checkpoint(args.run_dir, checkpoint_path=args.checkpoint, measures=args.measures,
                                    rho=args.rho, num_samples=args.num_samples, device=args.device,
                                    before_writing=ignore_stops)
    for name, value in result.items():
        print(f"{name:>16s}  {value:.6g}")


def landscape_main(argv: list[str] | None = None) -> None:
    """`sam-landscape RUN [RUN...]` or `sam-landscape --interpolate RUN_A RUN_B`: pictures of flatness, PNG + CSV."""
    parser = argparse.ArgumentParser(
        prog="sam-landscape", description=landscape_main.__doc__,
        epilog="Train and test loss along a filter-normalized random direction, one curve pair per run; or, with "
               "--interpolate, loss and accuracy along w(alpha) = alpha*w_B + (1-alpha)*w_A. docs/landscape.md")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories written by sam-run")
    parser.add_argument("--interpolate", action="store_true",
                        help="Keskar's parametric plot between exactly two runs of one network (same seed)")
    parser.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="t along the direction (default -1 1), or alpha with --interpolate (default -1 2)")
    parser.add_argument("--points", type=int, help="points along the line (default 41; 25 with --interpolate)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random direction and --num-samples' subset")
    parser.add_argument("--num-samples", type=int,
                        help="evaluate on a fixed, seeded subset of this many training and this many test samples "
                             "(default: all)")
    parser.add_argument("--bn-stats", choices=["recompute", "interpolate"],
                        help="with --interpolate: BatchNorm running statistics recomputed at each alpha (default) "
                             "or interpolated like the weights")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to evaluate (default: the run's device)")
    parser.add_argument("--out", type=Path, help="output directory (default: FIRST_RUN/landscape)")
    args = parser.parse_args(argv)
    if args.interpolate and len(args.runs) != 2:
        parser.error(f"--interpolate takes exactly two runs, RUN_A RUN_B (got {len(args.runs)})")
    if args.bn_stats and not args.interpolate:
        parser.error("--bn-stats applies only with --interpolate (a direction leaves BatchNorm statistics as trained)")
    warnings_in_one_line("sam-landscape")
    given = {"span": args.range, "points": args.points, "bn_stats": args.bn_stats}
    options = {"seed": args.seed, "num_samples": args.num_samples, "device": args.device,
               **{key: value for key, value in given.items() if value is not None}}
    with one_line_errors("sam-landscape", interrupted="the runs are as they were; the pictures are not finished") \
            as importing:
        with importing():  # torch: seconds
            from sam_runner.report import landscape
        if args.interpolate:
            paths = landscape.interpolation(*args.runs, args.out, **options)
        else:
            paths = landscape.directions(args.runs, args.out, **options)
    for path in paths:
        print(path)


def report_main(argv: list[str] | None = None) -> None:
    """`sam-report PATH [PATH...]`: seeds aggregated, Kendall's τ and plots for every run under the paths."""
    parser = argparse.ArgumentParser(prog="sam-report", description=report_main.__doc__)
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="sweep or run directories written by sam-run (searched recursively for summary.json)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: <first PATH>/report)")
    parser.add_argument("--no-pictures", action="store_true",
                        help="skip the flatness pictures of a small/large-batch pair (they read checkpoints)")
    args = parser.parse_args(argv)
    warnings_in_one_line("sam-report")  # e.g. a flatness picture skipped over a corrupt checkpoint
    with one_line_errors("sam-report", interrupted="the runs are as they were; the report is not finished") as importing:
        with importing():  # here, so that `sam-report --help` stays fast
            from sam_runner.report.runs import ReportError
            from sam_runner.report.writer import write_report
        try:
            report = write_report(args.paths, args.out, pictures=not args.no_pictures)
        except ReportError as error:  # one line for each path that holds no run
            for problem in error.problems:
                print(f"sam-report: error: {problem}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    print(report.markdown)
    print("wrote:", *(f"  {path}" for path in report.files), sep="\n")
