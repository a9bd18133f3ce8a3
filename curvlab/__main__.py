"""Command line: ``python -m curvlab list`` and ``python -m curvlab reproduce [NAMES...]``.

``reproduce`` runs the registered experiments (quick CPU sizes by default, ``--full`` for the
paper-scale GPU runs), writes tidy CSVs, PNG figures and ``<out>/summary.md``, and exits with a
non-zero status when an experiment raised or an experiment module failed to import. Claims that
do not hold are reported as findings (exit status 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m curvlab``."""
    parser = argparse.ArgumentParser(
        prog="python -m curvlab",
        description="curvlab: reproduce the documented experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered experiments and unavailable modules")
    rep = sub.add_parser("reproduce", help="run experiments (all if no NAMES are given)")
    rep.add_argument("names", nargs="*", metavar="NAMES",
                     help="experiment names or experiment module names (default: all)")
    rep.add_argument("--full", action="store_true", help="paper-scale sizes (GPU recommended)")
    rep.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto = cuda if available (default)")
    rep.add_argument("--out", default="results", help="results directory (default: results)")
    rep.add_argument("--seeds", type=_positive_int, default=None,
                     help="number of seeds (default: each experiment's own)")
    rep.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")

    from curvlab.experiments import list_experiments, make_context, module_status
    from curvlab.experiments.reproduce import reproduce, resolve_names

    status = module_status()
    broken = {m: s for m, s in status.items() if not s.available and not s.missing}
    missing = {m: s for m, s in status.items() if s.missing}

    if args.command == "list":
        for exp in list_experiments():
            module = exp.module.rsplit(".", 1)[-1]
            print(f"{exp.name:28s} {exp.title}  [{module}; {exp.paper}]")
        for module, s in status.items():
            if not s.available:
                print(f"{'(' + module + ')':28s} not available: {s.reason}")
        return 1 if broken else 0

    try:
        names = resolve_names(args.names)
    except ValueError as err:
        parser.error(str(err))
    try:
        ctx = make_context(args.out, full=args.full, device=args.device, seeds=args.seeds,
                           progress=not args.no_progress)
    except ValueError as err:
        parser.error(str(err))
    for module, s in broken.items():
        print(f"experiment module {module} failed to import:\n{s.detail}", file=sys.stderr)
    unavailable = {m: s.reason for m, s in status.items() if not s.available}
    try:
        reports = reproduce(names, ctx, unavailable=unavailable if not args.names else None)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are kept under {ctx.out_dir}; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    failed = [r.name for r in reports if r.status == "error"]
    if failed:
        print(f"experiments that raised: {', '.join(failed)}", file=sys.stderr)
    if failed or broken or missing:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
