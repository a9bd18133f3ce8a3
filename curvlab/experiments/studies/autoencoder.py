"""Deep auto-encoder optimization benchmark (Martens & Grosse 2015 §13; spec kfac.md §1.10).

Networks: the MNIST (784-1000-500-250-30) and CURVES (784-400-200-100-50-25-6) auto-encoders
with logistic hidden units, a linear code layer, logistic outputs and Martens' sparse init
(:func:`curvlab.problems.autoencoder`). Training loss: ``nn.BCEWithLogitsLoss()`` — the
Bernoulli negative log-likelihood *averaged over pixels and cases*, i.e. the papers' per-case
objective divided by the input dimension ``D``; to keep the papers' relative ℓ2 strength the
optimizers get ``weight_decay = 1e-5 / D`` and K-FAC's initial λ is the paper's 150 scaled by
``1/D``. Reported error: per-case squared reconstruction error ``||σ(logits) − x||²`` (the
papers' "training error").

Quick mode (CPU): ``digits`` (600 scikit-learn 8×8 digits = 64 inputs, MNIST-shaped net at
width 0.2: 64-200-100-50-30-50-100-200-64, 120 iterations) and ``curves`` (600 CURVES-like
images rendered at 14×14 = 196 inputs, CURVES-shaped net at width 0.5:
196-200-100-50-25-12-6-…, 200 iterations); every method runs the same number of iterations;
Martens' exponential batch schedule goes from 50 to the full 600 at iteration 60.
Full mode (GPU): MNIST (files under ``CURVLAB_DATA``) and CURVES-like (20,000) at full width,
schedule ``m_1 = 1000`` reaching the full batch at iteration 500.

Example:
    >>> [m.label for m in autoencoder_methods(64)][:2]
    ['K-FAC (block-diag, adaptive)', 'K-FAC (block-tridiag, adaptive)']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import nn

from curvlab.data import Dataset, get_dataset, make_curves
from curvlab.experiments.harness.comparison import (
    TrainingProblem,
    best_methods,
    build_problems,
    method_value,
    not_run_notes,
    run_comparison,
)
from curvlab.experiments.harness.optimizers import Method
from curvlab.experiments.harness.plotting import line_panels, save
from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.threads import quick_mode_threads
from curvlab.experiments.harness.training import exponential_batch_schedule
from curvlab.problems import autoencoder

__all__ = [
    "AUTOENCODER_PROBLEMS",
    "CURVEBALL_PER_EXAMPLE",
    "NAME",
    "autoencoder_methods",
    "autoencoder_problem",
    "deep_autoencoder",
    "run_deep_autoencoder",
]

NAME = "deep-autoencoder"
#: problem -> (network kind, hidden-width multiplier in quick mode); full mode uses width 1
AUTOENCODER_PROBLEMS: dict[str, tuple[str, float]] = {
    "digits": ("mnist", 0.2),
    "curves": ("curves", 0.5),
}
QUICK_TRAIN = 600
QUICK_TEST = 300
QUICK_CURVES_SIZE = 14
QUICK_ITERATIONS = {"digits": 120, "curves": 200}
PAPER_L2 = 1e-5
PAPER_LAMBDA0 = 150.0
#: label of the CurveBall row with λ per example (``damping_units="example"``, λ = 1/D here)
CURVEBALL_PER_EXAMPLE = "CurveBall (λ per example)"


def autoencoder_methods(input_dim: int, *, full: bool = False) -> list[Method]:
    """Compared methods for inputs of dimension ``input_dim`` (sets ℓ2 and λ scaling).

    K-FAC adaptive variants (block-diagonal and block-tridiagonal) use the paper's λ₀ = 150/D
    with automatic α, μ (untuned); block-diagonal K-FAC with fixed lr and momentum 0.9,
    SGD-momentum, Adam and Muon (``torch.optim.Muon`` on the weight matrices, AdamW at lr 3e-3
    on the biases) are tuned on small grids; CurveBall and Hessian-free run with their
    defaults (untuned). CurveBall's default λ = 1 is in the units of the loss as reduced, i.e.
    64× (D×) the reference's per-example damping on this pixel-averaged loss, which keeps it on
    the plateau; the extra row :data:`CURVEBALL_PER_EXAMPLE` (``damping_units="example"``, λ =
    1/D, the same 1/D translation as K-FAC's λ₀ and the ℓ2 term) is the remedy, also untuned.
    """
    wd = PAPER_L2 / input_dim
    lam0 = PAPER_LAMBDA0 / input_dim
    lr_sgd = [0.3, 1.0, 3.0, 10.0] if full else [0.3, 1.0, 3.0]
    lr_adam = [3e-4, 1e-3, 3e-3, 1e-2] if full else [1e-3, 3e-3, 1e-2]
    lr_muon = [1e-2, 3e-2, 1e-1, 3e-1] if full else [3e-2, 1e-1, 3e-1]
    kfac_grid: dict[str, list[Any]] = {"lr": [0.1, 0.3, 1.0], "damping": [0.01, 0.1, 1.0]} \
        if full else {"lr": [0.3, 1.0], "damping": [0.1]}
    methods = []
    for struct, short in (("block-diagonal", "block-diag"), ("block-tridiagonal", "block-tridiag")):
        methods.append(Method(f"K-FAC ({short}, adaptive)", "kfac", {
            "structure": struct, "adaptive": True, "damping": lam0, "weight_decay": wd}))
    methods.append(Method("K-FAC (block-diag, fixed lr)", "kfac", {
        "structure": "block-diagonal", "adaptive": False, "momentum": 0.9, "weight_decay": wd},
        kfac_grid))
    methods += [
        Method("CurveBall", "curveball", {"weight_decay": wd}),
        Method(CURVEBALL_PER_EXAMPLE, "curveball", {"weight_decay": wd,
                                                    "damping_units": "example"}),
        Method("Hessian-free", "hessian-free",
               {"weight_decay": wd, "max_cg_iters": 50 if full else 8}),
        Method("SGD-momentum", "sgd", {"momentum": 0.9, "weight_decay": wd}, {"lr": lr_sgd},
               first_order=True),
        Method("Adam", "adam", {"weight_decay": wd}, {"lr": lr_adam}, first_order=True),
        Method("Muon", "muon", {"weight_decay": wd, "adamw_lr": 3e-3}, {"lr": lr_muon},
               first_order=True),
    ]
    return methods


def _as_reconstruction(ds: Dataset) -> Dataset:
    if ds.task == "reconstruction":
        return ds
    flat_train = ds.x_train.reshape(ds.num_train, -1)
    flat_test = ds.x_test.reshape(ds.num_test, -1)
    return Dataset(flat_train, flat_train, flat_test, flat_test, name=ds.name, num_classes=None,
                   input_shape=(math.prod(ds.input_shape),), task="reconstruction")


@functools.lru_cache(maxsize=8)
def _load(name: str, full: bool, device: str) -> Dataset:
    """Data of problem ``name``: labelled sets become reconstruction sets (targets = inputs)."""
    if full:
        return _as_reconstruction(get_dataset("mnist" if name == "digits" else "curves",
                                              device=device, seed=0))
    if name == "curves":
        return make_curves(QUICK_TRAIN, QUICK_TEST, seed=0, image_size=QUICK_CURVES_SIZE,
                           device=device)
    ds = _as_reconstruction(get_dataset("digits", quick=True, device=device, seed=0))
    return Dataset(ds.x_train[:QUICK_TRAIN], ds.x_train[:QUICK_TRAIN], ds.x_test, ds.x_test,
                   name=ds.name, num_classes=None, input_shape=ds.input_shape,
                   task="reconstruction")


def autoencoder_problem(name: str, ctx: Context) -> TrainingProblem:
    """The :class:`TrainingProblem` ``name`` (``"digits"`` or ``"curves"``) at ctx's size.

    Raises ``FileNotFoundError`` in full mode when the MNIST files are missing.
    """
    if name not in AUTOENCODER_PROBLEMS:
        raise ValueError(f"autoencoder_problem: unknown problem {name!r}; known: "
                         f"{sorted(AUTOENCODER_PROBLEMS)}")
    kind, q_width = AUTOENCODER_PROBLEMS[name]
    dev = str(ctx.device)
    data = _load(name, ctx.full, dev)
    if ctx.full:
        width = 1.0
        n = data.num_train
        batch = exponential_batch_schedule(n, 1000, 500)
        return TrainingProblem(
            name, data, functools.partial(autoencoder, kind, width, data.input_shape[0]),
            nn.BCEWithLogitsLoss(), iterations=3000 if name == "digits" else 6000,
            batch_size=batch, batch_label={"first": 1000, "full_at": 500}, eval_every=50,
            time_budget=None, eval_train_size=10000, size="full")
    n = data.num_train
    return TrainingProblem(
        name, data, functools.partial(autoencoder, kind, q_width, data.input_shape[0]),
        nn.BCEWithLogitsLoss(), iterations=QUICK_ITERATIONS[name],
        batch_size=exponential_batch_schedule(n, 50, 60),
        batch_label={"first": 50, "full_at": 60}, eval_every=5, time_budget=None,
        size="quick")


WALL_CLOCK_TAG = "(wall-clock)"


def _claims(table: pd.DataFrame, ttt: pd.DataFrame, problems: Sequence[str]) -> list[Claim]:
    """Claims on final training errors after equal iterations (deterministic for a seed), then
    wall-clock claims (tagged ``(wall-clock)``: timing on a shared CPU is noisy)."""
    claims: list[Claim] = []
    ran = table[table["status"] == "ran"] if not table.empty else table

    def err(problem: str, method: str) -> float:
        return method_value(table, problem, method, "final_train_error")

    def secs(problem: str, method: str) -> float:
        row = ttt[(ttt["problem"] == problem) & (ttt["method"] == method)]
        return float(row["time_to_target_s"].mean()) if len(row) else math.nan

    for p in problems:
        kfacs = [m for m in ran["method"].unique() if m.startswith("K-FAC")] if len(ran) else []
        best_kfac = min(kfacs, key=lambda m: err(p, m)) if kfacs else "K-FAC"
        kfac = err(p, best_kfac)
        sgd, adam = err(p, "SGD-momentum"), err(p, "Adam")
        claims.append(Claim(
            f"[{p}] after equal iterations K-FAC has a lower training error than tuned "
            "SGD-momentum (M&G 2015: K-FAC far faster than SGD on deep auto-encoders)",
            kfac < sgd, f"{best_kfac} {kfac:.3f} vs SGD-momentum {sgd:.3f} (per-case sq. error)"))
        claims.append(Claim(
            f"[{p}] after equal iterations K-FAC has a lower training error than tuned Adam",
            kfac < adam, f"{best_kfac} {kfac:.3f} vs Adam {adam:.3f}"))
        muon = err(p, "Muon")
        if math.isfinite(muon):
            claims.append(Claim(
                f"[{p}] after equal iterations K-FAC has a lower training error than tuned Muon",
                kfac < muon, f"{best_kfac} {kfac:.3f} vs Muon {muon:.3f}"))
            for other in ("Hessian-free", "CurveBall"):
                val = err(p, other)
                if math.isfinite(val):
                    claims.append(Claim(
                        f"[{p}] after equal iterations untuned {other} has a lower training "
                        "error than tuned Muon", val < muon,
                        f"{other} {val:.3f} vs Muon {muon:.3f}"))
        ad, fx = err(p, "K-FAC (block-diag, adaptive)"), err(p, "K-FAC (block-diag, fixed lr)")
        if math.isfinite(ad) or math.isfinite(fx):
            claims.append(Claim(
                f"[{p}] automatic α/μ and λ adaptation (M&G §6-7) beat K-FAC with a tuned fixed "
                "lr and momentum", ad < fx, f"adaptive {ad:.3f} vs fixed-lr {fx:.3f}"))
        cb = err(p, "CurveBall")
        if math.isfinite(cb):
            claims.append(Claim(
                f"[{p}] untuned CurveBall beats tuned SGD-momentum after equal iterations",
                cb < sgd, f"CurveBall {cb:.3f} vs SGD-momentum {sgd:.3f}"))
        bd = err(p, "K-FAC (block-diag, adaptive)")
        td = err(p, "K-FAC (block-tridiag, adaptive)")
        if math.isfinite(td):
            claims.append(Claim(
                f"[{p}] block-tridiagonal K-FAC is at least as good per iteration as "
                "block-diagonal (M&G §13)", td <= bd, f"tridiag {td:.3f} vs diag {bd:.3f}"))
        if len(ttt) and p in set(ttt["problem"]):
            target = float(ttt[ttt["problem"] == p]["target"].iloc[0])
            first = ttt[(ttt["problem"] == p)
                        & ttt["method"].isin(["SGD-momentum", "Adam", "Muon"])]
            fo = float(first.groupby("method")["time_to_target_s"].mean().min())
            k_time = min((secs(p, m) for m in kfacs), default=math.nan)
            k_time = k_time if math.isfinite(k_time) else math.inf
            claims.append(Claim(
                f"[{p}] {WALL_CLOCK_TAG} K-FAC reaches the best first-order method's final "
                "training error in less optimizer time than that method",
                k_time < fo,
                f"target {target:.3f}: best K-FAC {k_time:.2f} s vs best first-order {fo:.2f} s"))
            hf = secs(p, "Hessian-free")
            if math.isfinite(k_time) or math.isfinite(hf):
                claims.append(Claim(
                    f"[{p}] {WALL_CLOCK_TAG} K-FAC reaches that target sooner than Hessian-free "
                    "(M&G 2015)", k_time < (hf if math.isfinite(hf) else math.inf),
                    f"best K-FAC {k_time:.2f} s vs HF {hf:.2f} s"))
    return claims


def run_deep_autoencoder(ctx: Context, problems: Sequence[str] = ("digits", "curves"),
                         *, seeds: Sequence[int] | None = None) -> Outcome:
    """Run the auto-encoder comparison on ``problems`` and return the :class:`Outcome`.

    The notebook calls this with ``problems=("digits",)`` to stay within its time limit;
    ``python -m curvlab reproduce deep-autoencoder`` runs both problems.
    """
    seeds = list(seeds) if seeds is not None else ctx.seed_list(1, full_default=3)
    built, skipped = build_problems(
        (name, functools.partial(autoencoder_problem, name, ctx)) for name in problems)
    result = run_comparison(NAME, built,
                            lambda p: autoencoder_methods(p.data.input_shape[0], full=ctx.full),
                            ctx, seeds=seeds, score="final_train_error")
    table = result.best_table()
    ttt = result.time_to_target(result.first_order_targets("train_error"), "train_error")
    if len(ttt) and not table.empty:
        mean_ttt = ttt.groupby(["problem", "method"], as_index=False)[
            ["iters_to_target", "time_to_target_s"]].mean()
        table = table.merge(mean_ttt, on=["problem", "method"], how="left")
    out = ctx.experiment_dir(NAME)
    figures = []
    trace = result.best_trace()
    if not trace.empty:
        fig = line_panels(trace, x=["iteration", "time_s"], y="train_error", hue="method",
                          row="problem", logy=True,
                          title="Deep auto-encoder: training error (per-case squared error)")
        figures.append(save(fig, out / "training_error.png"))
    names = [p.name for p in built]
    return Outcome(table, _claims(table, ttt, names), figures,
                   notes=not_run_notes(result, skipped),
                   key_numbers=best_methods(table, names, "final_train_error", "best"))


@register(NAME, title="Deep auto-encoders: K-FAC vs CurveBall, HF, SGD, Adam, Muon",
          paper="Martens & Grosse 2015 (K-FAC), §13")
def deep_autoencoder(ctx: Context) -> Outcome:
    """Registered entry point: both problems (digits, curves) at ctx's size."""
    with quick_mode_threads(ctx.full):  # same numbers as the notebook
        return run_deep_autoencoder(ctx)
