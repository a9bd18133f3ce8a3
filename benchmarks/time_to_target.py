"""Wall-clock time to a fixed training-loss target, per optimizer at its best grid setting.

For the deep auto-encoder (digits, quick size) and the basic CNN with BatchNorm (digits, quick
size) problems of ``curvlab.experiments``:

1. tune: every method's grid is trained once — the same resumable sweep (with the default
   ``--out results``, the same files, and in quick mode the same single pinned thread) as
   ``python -m curvlab reproduce``, so an earlier reproduce run is reused; the best setting is
   the one with the lowest final training loss;
2. target: the lowest final training loss any first-order method (SGD-momentum, Adam) reached
   at its best setting, times ``--slack`` (default 1.0);
3. time (torch's default threads): each method's best setting is re-trained ``--repeats``
   times, interleaved (method A, B, C, A, B, C, ...), stopping at the target; optimizer
   seconds (evaluation excluded) until the full-batch training loss first reaches the target;
   the median is reported, with its ratio to the best first-order method's median (ratio < 1:
   faster than tuned SGD/Adam).

4. extra methods (``benchmarks/_extra_methods.py``: Muon + AdamW, heavyball's SOAP and
   PSGD-Kron with ``--heavyball``, K-FAC adaptive, K-FAC preconditioner + SGD with and without
   ``kl_clip``, ``inverse='cholesky'``, ``split_dim=128``, ``AdaptiveRefresh()``,
   ``stats_fraction=1/8``) are tuned here over their own small grids (one run per point,
   lowest final training loss) and timed in the same interleaved rounds. Reported per method:
   iterations to the target, seconds, and milliseconds per iteration.

``--heavyball`` adds heavyball's SOAP and PSGD-Kron (compile-first: minutes of autotuning per
run on a CPU). ``--quick`` tunes the extra methods at their first grid point only (a check
that it runs).

Usage::

    python benchmarks/time_to_target.py [--problems autoencoder cnn] [--repeats 3]
        [--device auto] [--out results] [--full]

Writes ``<out>/benchmarks/time_to_target.md`` and ``.csv`` and prints the table.
Timings are only comparable within one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from pathlib import Path

import pandas as pd
from _extra_methods import extra_methods  # benchmarks/_extra_methods.py

from curvlab.experiments import autoencoder, cnn_classification, make_context, provenance
from curvlab.experiments.autoencoder import autoencoder_methods, autoencoder_problem
from curvlab.experiments.cnn_classification import cnn_methods, cnn_problem
from curvlab.experiments.comparison import run_comparison
from curvlab.experiments.optimizers import build_optimizer
from curvlab.experiments.reproduce import markdown_table
from curvlab.experiments.training import quick_mode_threads, train


def _problems(names, ctx):
    out = []
    if "autoencoder" in names:
        p = autoencoder_problem("digits", ctx)
        out.append(("autoencoder-digits", autoencoder.NAME, p,
                    autoencoder_methods(p.data.input_shape[0], full=ctx.full)))
    if "cnn" in names:
        p = cnn_problem(True, ctx)
        out.append(("cnn-batchnorm", cnn_classification.NAME, p, cnn_methods(True, full=ctx.full)))
    return out


def _tune_extras(label, problem, ctx, rows, quick, heavyball=False):
    """Tune every :func:`_extra_methods.extra_methods` method (lowest final training loss over
    its grid, one run per point at the sweep's length); a method that fails is a "not run" row.
    """
    out = []
    for extra in extra_methods(heavyball):
        best = None
        for hp in extra.points(quick):
            try:
                r = train(extra.make(hp), problem.model_factory, problem.data,
                          loss_fn=problem.loss_fn, iterations=problem.iterations,
                          batch_size=problem.batch_size, eval_every=problem.iterations,
                          device=ctx.device, seed=0, eval_train_size=problem.eval_train_size)
            except Exception as err:  # an optimizer that cannot run here: say why
                rows.append({"problem": label, "method": extra.label,
                             "setting": f"not run: {type(err).__name__}: {err}"[:200]})
                best = None
                break
            loss = r.summary["final_train_loss"]
            if math.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, hp)
        if best is not None:
            out.append((extra.label, extra.first_order, extra.make(best[1]), best[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["autoencoder", "cnn"],
                        choices=["autoencoder", "cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="results")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="check the script runs: the extra methods' first grid point only")
    parser.add_argument("--heavyball", action="store_true",
                        help="also SOAP / PSGD-Kron from heavyball (torch.compile: slow on CPU)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    ctx = make_context(args.out, full=args.full, device=args.device, progress=True)
    rows = []
    for label, experiment, problem, methods in _problems(args.problems, ctx):
        # same sweep (and results directory, and the same pinned single thread in quick mode) as
        # `python -m curvlab reproduce`: reused if present; the timing below uses default threads
        with quick_mode_threads(ctx.full):
            res = run_comparison(experiment, [problem], methods, ctx, seeds=[0],
                                 score="final_train_loss")
        best = res.best
        fo = best[best["first_order"].astype(bool)]
        target = float(fo["final_train_loss"].min()) * args.slack
        settings = []  # (label, first_order, opt_factory, hp)
        for method in methods:
            if (problem.name, method.label) in res.not_run:
                rows.append({"problem": label, "method": method.label, "setting": "not run: "
                             + res.not_run[(problem.name, method.label)]})
                continue
            row = best[best["method"] == method.label].iloc[0]
            hp = {c[3:]: row[c] for c in best.columns
                  if c.startswith("hp.") and row[c] != "-" and pd.notna(row[c])}
            kw = {**method.fixed, **hp}
            settings.append((method.label, method.first_order,
                             lambda m, lf, kw=kw, o=method.optimizer: build_optimizer(o, m, lf, kw),
                             hp))
        n_sweep = len(settings)  # SGD/Adam of the sweep set the target and the reference
        settings += _tune_extras(label, problem, ctx, rows, args.quick, args.heavyball)
        times: dict[str, list[float]] = {s[0]: [] for s in settings}
        iters: dict[str, list[float]] = {s[0]: [] for s in settings}
        for rep in range(args.repeats):
            for name, _, factory, _ in settings:
                r = train(factory, problem.model_factory, problem.data, loss_fn=problem.loss_fn,
                          iterations=2 * problem.iterations, batch_size=problem.batch_size,
                          eval_every=1, device=ctx.device, seed=0, target_loss=target,
                          stop_at_target=True, eval_train_size=problem.eval_train_size)
                times[name].append(r.summary["time_to_target"])
                iters[name].append(r.summary["iters_to_target"])
                print(f"[{label} rep {rep}] {name}: {r.summary['time_to_target']:.3f} s",
                      file=sys.stderr, flush=True)
        med = {k: statistics.median(v) if all(math.isfinite(x) for x in v) else math.inf
               for k, v in times.items()}
        best_fo = min((med[s[0]] for s in settings[:n_sweep] if s[1]), default=math.nan)
        for name, _, _, hp in settings:
            it = statistics.median(iters[name])
            rows.append({
                "problem": label, "method": name,
                "setting": ", ".join(f"{k}={v:g}" for k, v in hp.items()) or "default",
                "target_loss": target, "iters_to_target": it,
                "seconds_to_target": med[name],
                "ms_per_iteration": 1e3 * med[name] / it if it and math.isfinite(it) else math.nan,
                "ratio_to_best_first_order": med[name] / best_fo,
            })
    table = pd.DataFrame(rows)
    out = Path(args.out) / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "time_to_target.csv", index=False)
    prov = provenance(ctx.device)
    md = (f"Time to target (median of {args.repeats} interleaved repeats; {prov['device']}, "
          f"torch {prov['torch_version']}, git {prov['git_commit']}, {prov['timestamp']})\n\n"
          + markdown_table(table) + "\n")
    (out / "time_to_target.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
