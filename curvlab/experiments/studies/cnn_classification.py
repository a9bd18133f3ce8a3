"""CNN classification with and without BatchNorm (CurveBall paper Table 2 / Fig. 3; KFC on CIFAR).

Network: the CurveBall paper's basic CIFAR CNN (:func:`curvlab.problems.basic_cifar_net`, spec
curveball.md §6.3: four conv blocks, BN before ReLU, max/avg pooling, a 1×1 classifier conv),
with and without BatchNorm; loss ``nn.CrossEntropyLoss()`` (mean over the batch); batch 128;
no weight decay (as the authors' ``training.m``); no data augmentation (a difference from the
paper). Methods: CurveBall untuned (lr 1; λ = 1 with BN, 10 without, as in the authors' README
commands), SGD-momentum 0.9, Adam, Muon (``torch.optim.Muon`` on the convolution filters as
matrices, AdamW at lr 3e-3 on biases and BatchNorm) and K-FAC/KFC (fixed lr, momentum 0.9;
BatchNorm affine parameters get SP-NGD's unit-wise natural gradient) each tuned on a small lr
(and damping) grid, selected by final training loss.

Quick mode (CPU): the 8×8 scikit-learn digits as 1-channel images (1500 train / 297 test),
network at width 0.5 (16-16-32-32 channels), 5 epochs with BN (59 iterations) and 15 without
(176 iterations: without BN the net leaves its initial plateau later). Full mode (GPU): CIFAR-10
from ``CURVLAB_DATA``, width 1, 40 epochs with BN and 100 without (the authors' defaults).

Example:
    >>> [m.label for m in cnn_methods(batch_norm=False)][0]
    'CurveBall (untuned)'
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import nn

from curvlab.data import Dataset, get_dataset
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
from curvlab.problems import basic_cifar_net

__all__ = [
    "NAME",
    "cnn_classification",
    "cnn_methods",
    "cnn_problem",
    "run_cnn_classification",
]

NAME = "cnn-classification"
QUICK_EPOCHS = {True: 5, False: 15}  # keyed by batch_norm; without BN training starts slower
QUICK_WIDTH = 0.5
BATCH = 128
WALL_CLOCK_TAG = "(wall-clock)"


def cnn_methods(batch_norm: bool, *, full: bool = False) -> list[Method]:
    """Compared methods (CurveBall untuned; the others tuned on small grids)."""
    sgd = [0.003, 0.01, 0.03, 0.1] if full else [0.01, 0.03, 0.1]
    adam = [1e-4, 3e-4, 1e-3, 3e-3] if full else [3e-4, 1e-3, 3e-3]
    muon = [3e-3, 0.01, 0.03, 0.1] if full else [0.01, 0.03, 0.1]
    kfac: dict[str, list[Any]] = ({"lr": [0.03, 0.1, 0.3], "damping": [1e-3, 1e-2, 1e-1]}
                                  if full else {"lr": [0.1, 0.3], "damping": [0.01, 0.1]})
    return [
        Method("CurveBall (untuned)", "curveball",
               {"lr": 1.0, "lambd": 1.0 if batch_norm else 10.0}),
        Method("K-FAC (KFC)", "kfac", {"adaptive": False, "momentum": 0.9}, kfac),
        Method("SGD-momentum", "sgd", {"momentum": 0.9}, {"lr": sgd}, first_order=True),
        Method("Adam", "adam", {}, {"lr": adam}, first_order=True),
        Method("Muon", "muon", {"adamw_lr": 3e-3}, {"lr": muon}, first_order=True),
    ]


@functools.lru_cache(maxsize=4)
def _load(full: bool, device: str) -> Dataset:
    if full:
        return get_dataset("cifar10", device=device, seed=0, flatten=False)
    return get_dataset("digits", quick=True, device=device, seed=0, flatten=False)


def cnn_problem(batch_norm: bool, ctx: Context) -> TrainingProblem:
    """The problem with or without BatchNorm at ctx's size (full: CIFAR-10 files needed)."""
    data = _load(ctx.full, str(ctx.device))
    channels, size = data.input_shape[0], data.input_shape[-1]
    width = 1.0 if ctx.full else QUICK_WIDTH
    name = "batchnorm" if batch_norm else "no-batchnorm"
    epochs = (40 if batch_norm else 100) if ctx.full else QUICK_EPOCHS[batch_norm]
    iterations = math.ceil(epochs * data.num_train / BATCH)
    eval_every = math.ceil(data.num_train / BATCH) if ctx.full else 6
    return TrainingProblem(
        name, data, functools.partial(basic_cifar_net, batch_norm, channels, 10, size, width),
        nn.CrossEntropyLoss(), iterations=iterations, batch_size=BATCH, batch_label=BATCH,
        eval_every=eval_every, eval_train_size=10000 if ctx.full else None,
        size="full" if ctx.full else "quick")


def _claims(table: pd.DataFrame, problems: Sequence[str]) -> list[Claim]:
    claims: list[Claim] = []

    def get(problem: str, method: str, col: str) -> float:
        return method_value(table, problem, method, col)

    def ran(problem: str, method: str) -> bool:
        return bool(len(table)) and bool(
            ((table["problem"] == problem) & (table["method"] == method)
             & (table["status"] == "ran")).any())

    def show(v: float) -> str:
        return "diverged" if v == math.inf else f"{v:.4f}"

    for p in problems:
        cb = get(p, "CurveBall (untuned)", "final_train_loss")
        for fo in ("SGD-momentum", "Adam", "Muon"):
            if fo == "Muon" and not ran(p, fo):
                continue
            other = get(p, fo, "final_train_loss")
            claims.append(Claim(
                f"[{p}] untuned CurveBall reaches a training loss no higher than tuned {fo} "
                "after equal iterations" + ("" if fo == "Muon" else
                                            " (CurveBall Table 2, UNVERIFIED numbers)"),
                cb <= other, f"CurveBall {show(cb)} vs {fo} {show(other)}"))
        if ran(p, "K-FAC (KFC)"):  # a diverged K-FAC is a claim that does not hold
            kf = get(p, "K-FAC (KFC)", "final_train_loss")
            for fo in ("SGD-momentum", "Muon"):
                if fo == "Muon" and not ran(p, fo):
                    continue
                other = get(p, fo, "final_train_loss")
                claims.append(Claim(
                    f"[{p}] K-FAC/KFC reaches a lower training loss than tuned {fo} after "
                    "equal iterations" + (" (Grosse & Martens 2016)" if fo != "Muon" else ""),
                    kf < other, f"K-FAC {show(kf)} vs {fo} {show(other)}"))
        cbt = get(p, "CurveBall (untuned)", "train_time_s")
        sgdt = get(p, "SGD-momentum", "train_time_s")
        if math.isfinite(cbt) and math.isfinite(sgdt):
            ratio = cbt / sgdt
            claims.append(Claim(
                f"[{p}] {WALL_CLOCK_TAG} a CurveBall iteration costs at most 3× an SGD iteration "
                "(paper: two extra FMAD passes, 'comparable to two standard forward passes')",
                ratio <= 3.0, f"time per run ratio CurveBall/SGD = {ratio:.2f}"))
    if {"batchnorm", "no-batchnorm"} <= set(problems):
        bn = get("batchnorm", "SGD-momentum", "final_train_loss")
        nobn = get("no-batchnorm", "SGD-momentum", "final_train_loss")
        claims.append(Claim(
            "BatchNorm lowers the training loss reached by tuned SGD-momentum", bn < nobn,
            f"with BN {bn:.4f} vs without {nobn:.4f}"))
    return claims


def run_cnn_classification(ctx: Context, batch_norm: Sequence[bool] = (True, False), *,
                           seeds: Sequence[int] | None = None) -> Outcome:
    """Run the comparison for the given BatchNorm settings and return the :class:`Outcome`."""
    seeds = list(seeds) if seeds is not None else ctx.seed_list(1, full_default=3)
    built, skipped = build_problems(
        ("batchnorm" if bn else "no-batchnorm", functools.partial(cnn_problem, bn, ctx))
        for bn in batch_norm)
    result = run_comparison(
        NAME, built, lambda p: cnn_methods(p.name == "batchnorm", full=ctx.full), ctx,
        seeds=seeds, score="final_train_loss")
    table = result.best_table(score="final_train_loss")
    out = ctx.experiment_dir(NAME)
    figures = []
    trace = result.best_trace()
    if not trace.empty:
        figures.append(save(line_panels(
            trace, x=["iteration", "time_s"], y="train_loss", hue="method", row="problem",
            logy=True, title="Basic CNN: training loss"), out / "training_loss.png"))
        figures.append(save(line_panels(
            trace, x=["iteration", "time_s"], y="val_error", hue="method", row="problem",
            title="Basic CNN: validation error"), out / "validation_error.png"))
    names = [p.name for p in built]
    return Outcome(table, _claims(table, names), figures, notes=not_run_notes(result, skipped),
                   key_numbers=best_methods(table, names, "final_val_error", "best val err"))


@register(NAME, title="Basic CNN with/without BatchNorm: CurveBall vs SGD, Adam, Muon, K-FAC",
          paper="Henriques et al. 2019 (CurveBall) Table 2 / Fig. 3; Grosse & Martens 2016")
def cnn_classification(ctx: Context) -> Outcome:
    """Registered entry point: both BatchNorm settings at ctx's size."""
    with quick_mode_threads(ctx.full):  # same numbers as the notebook
        return run_cnn_classification(ctx)
