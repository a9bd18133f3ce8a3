"""Large-batch scaling of SGD, Muon and K-FAC (Ma et al. 2019/2020, arXiv 1903.06237; kfac.md §6).

For each batch size ``B`` and each grid point — SGD: learning rate × momentum; K-FAC: learning
rate × damping (momentum 0.9, block-diagonal, fixed lr, MC Fisher); Muon (``torch.optim.Muon``
on the weight matrices, AdamW at lr 3e-3 on the biases): learning rate × momentum — train until
the full-batch training loss reaches a target and record the number of iterations (evaluated
every ``eval_every`` iterations; capped). Outputs: the best iterations-to-target against ``B`` on
log-log axes with the ideal strong-scaling line ``steps(B₀)·B₀/B``, and heat maps of
iterations-to-target over the grid at every batch size (blank = target not reached), i.e. the
region of the hyperparameter space that reaches the target.

Quick mode (CPU): a 64-32-10 tanh MLP on the scikit-learn digits (1500 training images), loss
``nn.CrossEntropyLoss()`` (mean), target 0.15, batch sizes 16, 64, 256 and 1500 (full), at
most 400 iterations, the training loss evaluated after every iteration. Full mode: a wider MLP
(64-128-128-10), 6 batch sizes, finer grids (the paper's ResNet/CIFAR-10 setting is not
reproduced; see papers/large_batch.md).

Example:
    >>> large_batch_grids(full=False)["K-FAC"]["damping"]
    [0.01, 0.1, 1.0]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from curvlab.data import Dataset, get_dataset
from curvlab.experiments.harness.optimizers import Method, build_optimizer, unavailable_reason
from curvlab.experiments.harness.plotting import heatmap_panels, save
from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.runner import Run, RunResult, run_all
from curvlab.experiments.harness.threads import quick_mode_threads
from curvlab.experiments.harness.training import train
from curvlab.problems import small_mlp

__all__ = [
    "NAME",
    "SECOND_AXIS",
    "large_batch",
    "large_batch_grids",
    "large_batch_settings",
    "run_large_batch",
    "scaling_table",
]

NAME = "large-batch"
#: method -> second grid axis (the first is always "lr")
SECOND_AXIS = {"SGD": "momentum", "K-FAC": "damping", "Muon": "momentum"}


def large_batch_grids(full: bool = False) -> dict[str, dict[str, list[float]]]:
    """Hyperparameter grids per method (``lr`` × second axis)."""
    if full:
        return {"SGD": {"lr": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "momentum": [0.0, 0.5, 0.9, 0.95]},
                "K-FAC": {"lr": [0.01, 0.03, 0.1, 0.3, 1.0], "damping": [1e-3, 1e-2, 1e-1, 1.0]},
                "Muon": {"lr": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "momentum": [0.0, 0.9, 0.95]}}
    return {"SGD": {"lr": [0.03, 0.1, 0.3, 1.0], "momentum": [0.0, 0.9]},
            "K-FAC": {"lr": [0.1, 0.3, 1.0], "damping": [0.01, 0.1, 1.0]},
            "Muon": {"lr": [0.03, 0.1, 0.3, 1.0], "momentum": [0.0, 0.95]}}


def large_batch_settings(full: bool = False) -> dict[str, Any]:
    """Problem settings: batch sizes, target loss, iteration cap, evaluation interval, net."""
    if full:
        return {"batch_sizes": [8, 32, 128, 512, 1024, 1500], "target": 0.05,
                "max_iterations": 5000, "eval_every": 1, "hidden": [128, 128]}
    return {"batch_sizes": [16, 64, 256, 1500], "target": 0.15, "max_iterations": 400,
            "eval_every": 1, "hidden": [32]}


def _methods(full: bool) -> list[Method]:
    grids = large_batch_grids(full)
    return [Method("SGD", "sgd", {}, grids["SGD"], first_order=True),
            Method("K-FAC", "kfac", {"momentum": 0.9, "adaptive": False}, grids["K-FAC"]),
            Method("Muon", "muon", {"adamw_lr": 3e-3}, grids["Muon"], first_order=True)]


@functools.lru_cache(maxsize=2)
def _data(device: str) -> Dataset:
    return get_dataset("digits", quick=True, device=device, seed=0)


def scaling_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (method, batch size): best iterations-to-target over the grid (seed-mean, NaN if no
    setting reaches it), its setting, the fraction of grid settings that reach the target, and
    the ideal ``steps(B₀)·B₀/B`` from the smallest batch size that reached the target.

    Example:
        >>> df = pd.DataFrame({"method": ["SGD"] * 4, "batch_size": [8, 8, 16, 16],
        ...     "hp.lr": [0.1, 1.0, 0.1, 1.0], "seed": 0,
        ...     "iters_to_target": [40.0, 20.0, float("nan"), 12.0]})
        >>> cols = ["batch_size", "best_iters", "fraction_reached", "ideal_iters"]
        >>> scaling_table(df)[cols].values.tolist()
        [[8.0, 20.0, 1.0, 20.0], [16.0, 12.0, 0.5, 10.0]]
    """
    rows = []
    for (method, bsz), grp in summary.groupby(["method", "batch_size"], sort=True):
        hp = [c for c in grp.columns if c.startswith("hp.") and grp[c].notna().any()]
        per_setting = grp.groupby(hp, dropna=False)["iters_to_target"].mean()
        reached = per_setting[per_setting.notna()]
        row: dict[str, Any] = {"method": method, "batch_size": float(bsz),
                               "fraction_reached": float(len(reached) / len(per_setting))}
        if len(reached):
            best = reached.idxmin()
            best = best if isinstance(best, tuple) else (best,)
            row["best_iters"] = float(reached.min())
            row["best_setting"] = ", ".join(f"{h[3:]}={v:g}" for h, v in zip(hp, best))
        else:
            row["best_iters"] = math.nan
            row["best_setting"] = "target not reached"
        rows.append(row)
    table = pd.DataFrame(rows)
    table["ideal_iters"] = math.nan
    for _, grp in table.groupby("method"):
        ok = grp[grp["best_iters"].notna()]
        if len(ok):
            b0, s0 = ok["batch_size"].iloc[0], ok["best_iters"].iloc[0]
            table.loc[grp.index, "ideal_iters"] = s0 * b0 / grp["batch_size"]
    return table


def _scaling_figure(table: pd.DataFrame, target: float) -> Figure:
    fig = Figure(figsize=(5.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for i, (method, grp) in enumerate(table.groupby("method", sort=False)):
        color = f"C{i}"
        ax.plot(grp["batch_size"], grp["best_iters"], "o-", color=color, label=method)
        ax.plot(grp["batch_size"], grp["ideal_iters"], "--", color=color, alpha=0.6,
                label=f"{method}: ideal ∝ 1/B")
    ax.set_xscale("log")
    if bool((table["best_iters"] > 0).any()):
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "target not reached", transform=ax.transAxes, ha="center")
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"iterations to training loss ≤ {target:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def _heatmaps(summary: pd.DataFrame, method: str, cap: int) -> Figure:
    axis = SECOND_AXIS[method]
    part = summary[summary["method"] == method]
    tables = []
    for bsz, grp in part.groupby("batch_size", sort=True):
        pivot = grp.pivot_table(index="hp.lr", columns=f"hp.{axis}", values="iters_to_target",
                                aggfunc="mean", dropna=False)
        pivot.index.name, pivot.columns.name = "lr", axis
        tables.append((f"B = {bsz}", pivot))
    return heatmap_panels(tables, title=f"{method}: iterations to target (blank: not reached)",
                          cbar_label="iterations", vmax=float(cap))


def run_large_batch(ctx: Context, *, seeds: Sequence[int] | None = None) -> Outcome:
    """Run the batch-size × grid sweep and return the :class:`Outcome`."""
    seeds = list(seeds) if seeds is not None else ctx.seed_list(1, full_default=3)
    s = large_batch_settings(ctx.full)
    data = _data(str(ctx.device))
    d_in = data.input_shape[0]
    model_factory = functools.partial(small_mlp, d_in, tuple(s["hidden"]), 10)
    loss_fn = nn.CrossEntropyLoss()
    runs, not_run, methods = [], {}, {}
    for method in _methods(ctx.full):
        reason = unavailable_reason(method, model_factory, loss_fn)
        if reason is not None:
            not_run[method.label] = reason
            continue
        methods[method.label] = method
        for bsz in s["batch_sizes"]:
            for hp in method.grid_points():
                for seed in seeds:
                    runs.append(Run(NAME, {
                        "method": method.label, "optimizer": method.optimizer,
                        "batch_size": min(bsz, data.num_train), "hp": hp,
                        "fixed": dict(method.fixed), "target": s["target"],
                        "max_iterations": s["max_iterations"], "eval_every": s["eval_every"],
                        "hidden": s["hidden"], "size": "full" if ctx.full else "quick"},
                        seed=seed))

    def fn(run: Run) -> RunResult:
        cfg = run.config
        method = methods[cfg["method"]]
        hp = {**cfg["fixed"], **cfg["hp"]}
        result = train(lambda m, lf: build_optimizer(method.optimizer, m, lf, hp), model_factory,
                       data, loss_fn=loss_fn, iterations=cfg["max_iterations"],
                       batch_size=cfg["batch_size"], eval_every=cfg["eval_every"],
                       device=ctx.device, seed=run.seed, target_loss=cfg["target"],
                       stop_at_target=True)
        return RunResult(result.summary)  # no per-iteration trace: the summary is the result

    summary, _ = run_all(runs, fn, ctx.out_dir, desc=NAME, progress=ctx.progress,
                         device=ctx.device)
    out = ctx.experiment_dir(NAME)
    figures = []
    claims: list[Claim] = []
    table = pd.DataFrame()
    if not summary.empty:
        table = scaling_table(summary)
        figures.append(save(_scaling_figure(table, s["target"]), out / "iterations_vs_batch.png"))
        for label in methods:
            figures.append(save(_heatmaps(summary, label, s["max_iterations"]),
                                out / f"heatmap_{label.lower().replace('-', '')}.png"))
        claims = _claims(table)
    notes = "; ".join(f"{m}: not run: {r}" for m, r in not_run.items())
    key = {}
    for _, row in table.iterrows():
        if row["batch_size"] in (table["batch_size"].min(), table["batch_size"].max()):
            key[f"{row['method']} B={row['batch_size']:g}"] = row["best_iters"]
    return Outcome(table, claims, figures, notes=notes, key_numbers=key)


def _claims(table: pd.DataFrame) -> list[Claim]:
    claims: list[Claim] = []
    speedups: dict[str, float] = {}
    for method, grp in table.groupby("method", sort=False):
        grp = grp.sort_values("batch_size")
        small, large = grp.iloc[0], grp.iloc[-1]
        ideal = large["ideal_iters"]
        actual = large["best_iters"]
        gap = actual / ideal if np.isfinite(actual) and np.isfinite(ideal) else math.inf
        claims.append(Claim(
            f"{method} deviates from ideal 1/B scaling at the largest batch (more than 2× the "
            "ideal number of iterations; Ma et al.)", gap > 2.0,
            f"B={large['batch_size']:g}: {actual:g} iterations vs ideal {ideal:.3g} "
            f"(×{gap:.3g})"))
        speedups[method] = (small["best_iters"] / actual if np.isfinite(actual) else 0.0)
        claims.append(Claim(
            f"{method}: the fraction of the grid that reaches the target shrinks from the "
            "smallest to the largest batch (hyperparameter sensitivity; Ma et al., [mem])",
            large["fraction_reached"] < small["fraction_reached"],
            f"{small['fraction_reached']:.2f} at B={small['batch_size']:g} vs "
            f"{large['fraction_reached']:.2f} at B={large['batch_size']:g}"))
    both = table.pivot_table(index="batch_size", columns="method", values="best_iters",
                             dropna=False)
    for other, source in (("SGD", "; Ma et al."), ("Muon", "")):
        if not {other, "K-FAC"} <= set(speedups):
            continue
        claims.append(Claim(
            f"K-FAC does not scale better with batch size than {other} (speed-up in iterations "
            f"from the smallest to the largest batch no larger than {other}'s{source})",
            speedups["K-FAC"] <= speedups[other],
            f"speed-up K-FAC ×{speedups['K-FAC']:.3g} vs {other} ×{speedups[other]:.3g}"))
        fewer = bool((both["K-FAC"].fillna(math.inf) < both[other].fillna(math.inf)).all())
        claims.append(Claim(
            f"K-FAC needs fewer iterations than {other} at every batch size", fewer,
            "; ".join(f"B={b:g}: K-FAC {r['K-FAC']:g} vs {other} {r[other]:g}"
                      for b, r in both.iterrows())))
    return claims


@register(NAME, title="Large-batch scaling and hyperparameter sensitivity: SGD, Muon, K-FAC",
          paper="Ma et al. 2019/2020 (arXiv 1903.06237)")
def large_batch(ctx: Context) -> Outcome:
    """Registered entry point."""
    with quick_mode_threads(ctx.full):  # same numbers as the notebook
        return run_large_batch(ctx)
