"""Stale statistics, adaptive refresh intervals and block-split factors (SP-NGD; THOR).

Osawa et al. (SP-NGD, arXiv 2002.06015) recompute a Kronecker factor only when it has changed
(``‖X_new − X‖_F / ‖X‖_F ≥ α`` shrinks its refresh interval, otherwise it grows) and give
BatchNorm a unit-wise 2×2 natural gradient; Chen et al. (THOR, AAAI 2021) skip a layer's inverse
refresh while its factors' traces change by less than ω (their released code: a fixed frequency)
and split large factors into diagonal blocks of ``split_dim``. What we reproduce is the mechanism,
not the headline ImageNet numbers (:data:`PAPER_CLAIMS`, not run: 1,024 GPUs / 8 Ascend 910).

Methods (momentum 0.9, MC Fisher, fixed lr, eigen inverse; every K-FAC variant uses the lr and
damping tuned for K-FAC refreshing on every step, so differences come from the refresh policy):
K-FAC (every step), SP-NGD adaptive staleness (two α), THOR's trace rule, THOR's fixed
frequency, every-step K-FAC with the plain gradient for BatchNorm (``unitwise=False``), and
SGD-momentum and Adam tuned on small lr grids; selection by final training loss. The split sweep
trains every-step K-FAC at ``split_dim ∈ {32, 64, 128, 256}`` and measures, on the unsplit run's
final factors and a 512-example gradient, the relative error of the split damped inverse applied
to the gradient and the cost of applying it (:func:`~.stale_tools.split_errors`).

Quick mode (CPU, one intra-op thread): the 8×8 scikit-learn digits (1500 train / 297 test) and
:func:`~.stale_tools.stale_cnn` (conv16-BN-conv32-BN, classifier ``Linear(512, 10)``), batch
128, 60 iterations. Full mode (GPU): CIFAR-10 from ``CURVLAB_DATA`` with a CIFAR ResNet-18, or,
without the files, the same net on the synthetic CIFAR-shaped stand-in (random labels: only
memorization can be learned; stated in the notes).

Example:
    >>> [m[0] for m in refresh_methods(stale_settings(False))][:2]
    ['K-FAC (every step)', 'SP-NGD (adaptive, α=0.1)']
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from curvlab.data import Dataset, get_dataset
from curvlab.experiments.harness.optimizers import build_optimizer
from curvlab.experiments.harness.provenance import provenance
from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.runner import Run, RunResult, run_all
from curvlab.experiments.harness.selection import first_crossing, select_best
from curvlab.experiments.harness.threads import quick_mode_threads
from curvlab.experiments.harness.training import train
from curvlab.experiments.studies.stale_figures import curves_figure, interval_figure, split_figure
from curvlab.experiments.studies.stale_tools import (
    EVERY_STEP,
    make_refresh,
    refresh_fractions,
    resnet18,
    split_errors,
    stale_cnn,
)

__all__ = ["NAME", "PAPER_CLAIMS", "SPLIT_DIMS", "refresh_methods", "run_stale_statistics",
           "stale_problem", "stale_settings", "stale_statistics"]

NAME = "stale-statistics"
SPLIT_DIMS: tuple[int | None, ...] = (32, 64, 128, 256, None)
EVERY = "K-FAC (every step)"
WALL_CLOCK_TAG = "(wall-clock)"
#: Claim thresholds, chosen from the quick-mode measurements (papers/spngd_thor.md).
ADAPTIVE_MAX_FRACTION = 0.2
THOR_MAX_FRACTION = 0.4
LOSS_FACTOR = 2.0
PLAIN_BN = "K-FAC (every step, plain-gradient BN)"
#: Headline results of the papers, recorded but not run (scale).
PAPER_CLAIMS: tuple[tuple[str, str], ...] = (
    ("SP-NGD: ResNet-50 on ImageNet reaches 75.4 % top-1 in 5.5 minutes (mini-batch 32,768, "
     "1,024 GPUs); 74.9 % at mini-batch 131,072 in 873 steps", "not run: 1,024 GPUs"),
    ("THOR: ResNet-50 on ImageNet reaches 75.9 % top-1 in 66.7 minutes on 8 Ascend 910 "
     "(2.7 minutes on 256)", "not run: 8 Ascend 910, MindSpore"),
)


def stale_settings(full: bool = False) -> dict[str, Any]:
    """Budget, grids and policy parameters (quick: CPU digits; full: GPU CIFAR-10)."""
    if full:
        return {"iterations": 980, "batch": 256, "eval_every": 98, "eval_train_size": 10000,
                "kfac": {"lr": [0.03, 0.1], "damping": [0.03, 0.1]},
                "sgd": [0.01, 0.03, 0.1, 0.3], "adam": [1e-4, 3e-4, 1e-3, 3e-3],
                "alphas": [0.1, 1.0], "max_interval": 50, "omega": 0.1, "frequency": 10,
                "split_dims": list(SPLIT_DIMS), "grad_examples": 512, "repeats": 20}
    return {"iterations": 60, "batch": 128, "eval_every": 6, "eval_train_size": None,
            "kfac": {"lr": [0.03, 0.1], "damping": [0.1]},
            "sgd": [0.03, 0.1, 0.3], "adam": [3e-3, 1e-2, 3e-2],
            "alphas": [0.1, 1.0], "max_interval": 20, "omega": 0.1, "frequency": 10,
            "split_dims": list(SPLIT_DIMS), "grad_examples": 512, "repeats": 10}


def refresh_methods(s: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(label, refresh spec, extra K-FAC options)`` of the refresh-policy comparison."""
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = [(EVERY, dict(EVERY_STEP), {})]
    for a in s["alphas"]:
        out.append((f"SP-NGD (adaptive, α={a:g})",
                    {"policy": "adaptive", "alpha": a, "grow": "double", "shrink": "reset",
                     "max_interval": s["max_interval"]}, {}))
    out += [(f"THOR (trace rule, ω={s['omega']:g})", {"policy": "trace", "omega": s["omega"]},
             {}),
            (f"THOR (frequency {s['frequency']})",
             {"policy": "frequency", "frequency": s["frequency"]}, {}),
            (PLAIN_BN, dict(EVERY_STEP), {"unitwise": False})]
    return out


@functools.lru_cache(maxsize=4)
def _load(full: bool, device: str) -> tuple[Dataset, str]:
    if not full:
        return get_dataset("digits", quick=True, device=device, seed=0, flatten=False), ""
    try:
        return get_dataset("cifar10", device=device, seed=0, flatten=False), ""
    except (FileNotFoundError, OSError) as err:
        note = (f"CIFAR-10 not available ({err}); full mode ran on the synthetic CIFAR-shaped "
                "stand-in (random labels: only memorization can be learned)")
        return get_dataset("synthetic-cifar", device=device, seed=0), note


def stale_problem(ctx: Context) -> tuple[Dataset, Any, str]:
    """``(data, model factory, note)`` at ctx's size (note: data substitution, or empty)."""
    data, note = _load(ctx.full, str(ctx.device))
    channels, size = data.input_shape[0], data.input_shape[-1]
    if ctx.full:
        return data, functools.partial(resnet18, data.num_classes, channels), note
    return data, functools.partial(stale_cnn, channels, data.num_classes, size), note


def _grads(model: nn.Module, loss_fn, data: Dataset, n: int) -> dict[str, torch.Tensor]:
    x, y = data.train
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad])
    loss = loss_fn(model(x[:n]), y[:n])
    return dict(zip(names, torch.autograd.grad(loss, params)))


def _run_fn(ctx: Context, data: Dataset, model_factory, s: Mapping[str, Any]):
    out = ctx.experiment_dir(NAME)
    loss_fn = nn.CrossEntropyLoss()

    def fn(run: Run) -> RunResult:
        cfg = run.config
        got: dict[str, Any] = {}

        def factory(model: nn.Module, lf) -> Any:
            hp = {**cfg["fixed"], **cfg["hp"]}
            if cfg["optimizer"] == "kfac":
                hp.update(refresh=make_refresh(cfg["refresh"]), split_dim=cfg["split_dim"],
                          unitwise=cfg["unitwise"])
            got["opt"], got["model"] = build_optimizer(cfg["optimizer"], model, lf, hp), model
            return got["opt"]

        res = train(factory, model_factory, data, loss_fn=loss_fn, iterations=s["iterations"],
                    batch_size=s["batch"], eval_every=s["eval_every"], device=ctx.device,
                    seed=run.seed, eval_train_size=s["eval_train_size"])
        summary = dict(res.summary)
        opt = got["opt"]
        if cfg["optimizer"] == "kfac":
            summary.update(refresh_fractions(opt.refresh_policy, summary["iterations"]))
            mem = opt.memory_usage()
            summary.update(factors_bytes=mem["factors"], inverses_bytes=mem["inverses"])
            log = pd.DataFrame(opt.refresh_log, columns=["step", "layer", "what", "interval"])
            (out / "refresh").mkdir(exist_ok=True)
            log.to_csv(out / "refresh" / f"{run.key}.csv", index=False)
            if cfg["method"] == EVERY:
                g = _grads(got["model"], loss_fn, data, min(s["grad_examples"], data.num_train))
                (out / "split").mkdir(exist_ok=True)
                split_errors(opt.engine, g, opt.damping, s["split_dims"],
                             repeats=s["repeats"]).to_csv(out / "split" / f"{run.key}.csv",
                                                          index=False)
        return RunResult(summary, res.trace)

    return fn


def _run(method: str, part: str, optimizer: str, hp: dict[str, Any], fixed: dict[str, Any],
         seed: int, s: Mapping[str, Any], size: str, refresh: dict[str, Any] | None = None,
         split_dim: int | None = None, unitwise: bool = True) -> Run:
    cfg: dict[str, Any] = {
        "part": part, "method": method, "optimizer": optimizer, "hp": hp, "fixed": fixed,
        "size": size, "budget": {k: s[k] for k in ("iterations", "batch", "eval_every")}}
    if optimizer == "kfac":
        cfg.update(refresh=refresh, split_dim=split_dim, unitwise=unitwise)
    return Run(NAME, cfg, seed=seed)


def _grid(values: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = [{}]
    for name, vals in values.items():
        points = [{**p, name: v} for p in points for v in vals]
    return points


def _table(summary: pd.DataFrame) -> pd.DataFrame:
    best = select_best(summary, ["method"], score="final_train_loss")
    cols = ["final_train_loss", "final_train_error", "final_val_error", "train_time_s",
            "iterations", "factor_refresh_fraction", "inverse_refresh_fraction",
            "factors_bytes", "inverses_bytes"]
    rows = []
    for method, grp in best.groupby("method", sort=False):
        row: dict[str, Any] = {"part": grp["part"].iloc[0], "method": method,
                               "setting": ", ".join(f"{c[3:]}={grp[c].iloc[0]:g}" for c in grp
                                                    if c.startswith("hp.")
                                                    and grp[c].iloc[0] != "-"),
                               "split_dim": grp["split_dim"].iloc[0] if "split_dim" in grp
                               else math.nan,
                               "diverged": bool(grp["diverged"].astype(bool).any()),
                               "seeds": len(grp)}
        row.update({c: float(pd.to_numeric(grp[c], errors="coerce").mean()) for c in cols
                    if c in grp})
        row["final_val_accuracy"] = 1.0 - row["final_val_error"]
        rows.append(row)
    order = {"refresh": 0, "baseline": 1, "split": 2}
    return (pd.DataFrame(rows).sort_values("part", key=lambda p: p.map(order), kind="stable")
            .reset_index(drop=True)), best


def run_stale_statistics(ctx: Context, *, seeds: Sequence[int] | None = None,
                         settings: Mapping[str, Any] | None = None) -> Outcome:
    """Run the refresh-policy comparison and the split sweep; return the :class:`Outcome`.

    ``settings`` overrides :func:`stale_settings` entries (tests use a tiny budget).
    """
    s = {**stale_settings(ctx.full), **(settings or {})}
    seeds = list(seeds) if seeds is not None else ctx.seed_list(1, full_default=2)
    data, model_factory, note = stale_problem(ctx)
    size = "full" if ctx.full else "quick"
    fn = _run_fn(ctx, data, model_factory, s)
    mom = {"momentum": 0.9}
    kfac_fixed = {"momentum": 0.9, "adaptive": False}
    first = [_run(EVERY, "refresh", "kfac", hp, kfac_fixed, seed, s, size, dict(EVERY_STEP))
             for hp in _grid(s["kfac"]) for seed in seeds]
    first += [_run("SGD-momentum", "baseline", "sgd", {"lr": lr}, mom, seed, s, size)
              for lr in s["sgd"] for seed in seeds]
    first += [_run("Adam", "baseline", "adam", {"lr": lr}, {}, seed, s, size)
              for lr in s["adam"] for seed in seeds]
    summary, _ = run_all(first, fn, ctx.out_dir, desc=NAME, progress=ctx.progress,
                         device=ctx.device)
    kbest = select_best(summary[summary["method"] == EVERY], ["method"])
    hp = {"lr": float(kbest["hp.lr"].iloc[0]), "damping": float(kbest["hp.damping"].iloc[0])}
    second = [_run(label, "refresh", "kfac", hp, kfac_fixed, seed, s, size, spec,
                   unitwise=extra.get("unitwise", True))
              for label, spec, extra in refresh_methods(s)[1:] for seed in seeds]
    second += [_run(f"K-FAC split {k}", "split", "kfac", hp, kfac_fixed, seed, s, size,
                    dict(EVERY_STEP), split_dim=k)
               for k in s["split_dims"] if k is not None for seed in seeds]
    summary, trace = run_all([*first, *second], fn, ctx.out_dir, desc=NAME,
                             progress=ctx.progress, device=ctx.device)
    table, best = _table(summary)
    out = ctx.experiment_dir(NAME)
    prov = provenance(ctx.device)
    split = _split_table(out, table, kbest, prov)
    logs = _refresh_logs(out, best, prov)
    curves = trace[trace["key"].isin(set(best["key"]))].copy()
    curves["val_accuracy"] = 1.0 - curves["val_error"]
    table = _to_target(table, curves, _get(table, "SGD-momentum", "final_train_loss"))
    figures = [curves_figure(curves, out / "training_curves.png")]
    if not logs.empty:
        figures.append(interval_figure(logs, table, s["iterations"],
                                       out / "refresh_intervals.png"))
    if not split.empty:
        figures.append(split_figure(split, out / "split_tradeoff.png"))
    notes = "; ".join([n for n in (note,) if n] + [f"{c}: {v}" for c, v in PAPER_CLAIMS])
    return Outcome(table, _claims(table, split), figures, notes=notes,
                   key_numbers=_key_numbers(table))


def _to_target(table: pd.DataFrame, curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Add seed-mean iterations and optimizer seconds until the training loss first reaches
    ``target`` (tuned SGD-momentum's final loss; NaN: never)."""
    table = table.copy()
    table["target_loss"] = target
    for col, at in (("iters_to_target", "iteration"), ("time_to_target_s", "time_s")):
        per = {m: pd.Series([first_crossing(g.sort_values("iteration"), target, at=at)
                             for _, g in grp.groupby("seed")]).mean()
               for m, grp in curves.groupby("method")}
        table[col] = table["method"].map(per)
    return table


def _split_table(out: Path, table: pd.DataFrame, kbest: pd.DataFrame,
                 prov: Mapping[str, str]) -> pd.DataFrame:
    path = out / "split" / f"{kbest['key'].iloc[0]}.csv"
    if not path.exists():
        return pd.DataFrame()
    err = pd.read_csv(path)
    err["split_dim"] = err["split_dim"].astype(object).where(err["split_dim"].notna(), None)
    rows = []
    for _, e in err.iterrows():
        label = EVERY if e["split_dim"] is None else f"K-FAC split {int(e['split_dim'])}"
        t = table[table["method"] == label]
        row = {"split_dim": "none" if e["split_dim"] is None else int(e["split_dim"]),
               **{c: e[c] for c in ("rel_error", "precondition_ms", "refresh_ms")}}
        for c in ("final_train_loss", "train_time_s", "factors_bytes", "inverses_bytes"):
            row[c] = float(t[c].iloc[0]) if len(t) else math.nan
        rows.append(row)
    split = pd.DataFrame(rows)
    split.assign(**prov).to_csv(out / "split.csv", index=False)
    return split


def _refresh_logs(out: Path, best: pd.DataFrame, prov: Mapping[str, str]) -> pd.DataFrame:
    frames = []
    for _, r in best.iterrows():
        path = out / "refresh" / f"{r['key']}.csv"
        if path.exists():
            log = pd.read_csv(path)
            frames.append(log.assign(method=r["method"], key=r["key"], seed=r["seed"]))
    logs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not logs.empty:
        logs.assign(**prov).to_csv(out / "refresh_log.csv", index=False)
    return logs


def _get(table: pd.DataFrame, method: str, col: str) -> float:
    row = table[table["method"] == method]
    if row.empty or bool(row["diverged"].iloc[0]):
        return math.inf
    return float(row[col].iloc[0])


def _claims(table: pd.DataFrame, split: pd.DataFrame) -> list[Claim]:
    claims: list[Claim] = []
    loss = functools.partial(_get, table, col="final_train_loss")
    ref = loss(EVERY)
    for method in table.loc[table["part"] == "refresh", "method"]:
        if method in (EVERY, PLAIN_BN):
            continue
        f = _get(table, method, "factor_refresh_fraction")
        i = _get(table, method, "inverse_refresh_fraction")
        kind, frac, cap = (("factor updates", f, ADAPTIVE_MAX_FRACTION)
                           if method.startswith("SP-NGD") else
                           ("inverse refreshes", i, THOR_MAX_FRACTION))
        claims.append(Claim(
            f"[{method}] performs at most {cap:.0%} of every-step K-FAC's {kind} and ends "
            f"within {LOSS_FACTOR:g}× of its final training loss",
            frac <= cap and loss(method) <= LOSS_FACTOR * ref,
            f"{kind} {frac:.1%} (factors {f:.1%}, inverses {i:.1%}); loss "
            f"{loss(method):.4g} vs every-step {ref:.4g} (×{loss(method) / ref:.2f})"))
        t, t0 = _get(table, method, "train_time_s"), _get(table, EVERY, "train_time_s")
        claims.append(Claim(
            f"[{method}] {WALL_CLOCK_TAG} takes less optimizer time than every-step K-FAC",
            t < t0, f"{t:.2f} s vs {t0:.2f} s (×{t / t0:.2f})"))
    plain = loss(PLAIN_BN)
    claims.append(Claim(
        "SP-NGD's unit-wise natural gradient for BatchNorm reaches a lower training loss than "
        "the plain gradient for BatchNorm (every-step K-FAC, same lr and damping)",
        ref < plain, f"unit-wise {ref:.4g} vs plain-gradient BN {plain:.4g}"))
    for fo in ("SGD-momentum", "Adam"):
        other = loss(fo)
        claims.append(Claim(f"every-step K-FAC reaches a lower training loss than tuned {fo} "
                            "after equal iterations", ref < other,
                            f"K-FAC {ref:.4g} vs {fo} {other:.4g}"))
    if len(split) > 1:
        parts = split[split["split_dim"] != "none"]
        err = parts["rel_error"].tolist()
        claims.append(Claim(
            "the split inverse's error shrinks as split_dim grows (32 → 256), and every split "
            "holds less inverse memory than the unsplit inverse",
            all(a >= b for a, b in itertools.pairwise(err))
            and bool((parts["inverses_bytes"] < _get(table, EVERY, "inverses_bytes")).all()),
            "relative errors " + ", ".join(f"{k}: {e:.3g}" for k, e in
                                           zip(parts["split_dim"], err))))
        k128 = _get(table, "K-FAC split 128", "final_train_loss")
        claims.append(Claim(
            f"K-FAC with split_dim=128 ends within {LOSS_FACTOR:g}× of unsplit K-FAC's final "
            "training loss", k128 <= LOSS_FACTOR * ref,
            f"split 128 {k128:.4g} vs unsplit {ref:.4g}"))
        r = split.set_index("split_dim")["refresh_ms"]
        if 32 in r and "none" in r:
            claims.append(Claim(
                f"{WALL_CLOCK_TAG} split_dim=32 eigendecompositions cost less than unsplit ones",
                r[32] < r["none"], f"{r[32]:.2f} ms vs {r['none']:.2f} ms"))
    return claims


def _key_numbers(table: pd.DataFrame) -> dict[str, str]:
    key = {}
    for _, r in table[table["part"] == "refresh"].iterrows():
        key[r["method"]] = (f"loss {r['final_train_loss']:.3g}, refresh "
                            f"{r['factor_refresh_fraction']:.0%}/{r['inverse_refresh_fraction']:.0%}")
    return key


@register(NAME, title="Stale statistics (SP-NGD), THOR's trace rule and block-split factors",
          paper="Osawa et al. 2020 (SP-NGD, arXiv 2002.06015); Chen et al. 2021 (THOR, AAAI)")
def stale_statistics(ctx: Context) -> Outcome:
    """Registered entry point at ctx's size."""
    with quick_mode_threads(ctx.full):  # same numbers as the notebook
        return run_stale_statistics(ctx)
