"""Shared training loop of the optimizer-comparison experiments.

:func:`train` runs any curvlab optimizer (``loss = opt.step(inputs, targets)``) on a
:class:`~curvlab.data.Dataset` and returns trace rows at evaluation points: iteration, training
wall-clock (optimizer steps only, evaluation excluded, CUDA synchronized), the full-batch training
loss and error, the validation loss and error, and the mini-batch size. Errors are the
classification error rate for classification data and the per-case squared reconstruction error
``(1/N) Σ_n ||σ(logits_n) − x_n||²`` (the K-FAC/HF auto-encoder metric) for reconstruction data.
Losses are whatever ``loss_fn`` computes (its reduction is the caller's convention); ℓ2
regularization belongs to the optimizer (``weight_decay``) and is not part of reported losses.

Example:
    >>> import torch
    >>> from curvlab.data import get_dataset
    >>> from curvlab.optim import TorchOptimizer
    >>> data = get_dataset("digits", quick=True)
    >>> res = train(lambda m, lf: TorchOptimizer(m, lf, torch.optim.Adam, lr=1e-2),
    ...             lambda: torch.nn.Linear(64, 10), data, loss_fn=torch.nn.CrossEntropyLoss(),
    ...             iterations=20, batch_size=100, eval_every=10)
    >>> [row["iteration"] for row in res.trace]
    [0, 10, 20]
    >>> res.summary["final_train_error"] < 0.5
    True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.data import Dataset

__all__ = [
    "BatchSize",
    "TrainResult",
    "evaluate",
    "exponential_batch_schedule",
    "train",
]

#: A constant mini-batch size or a schedule ``k -> m_k`` (``k`` counts iterations from 1).
BatchSize = int | Callable[[int], int]


@dataclass
class TrainResult:
    """Output of :func:`train`: ``trace`` rows at evaluation points and one ``summary`` row."""

    trace: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def exponential_batch_schedule(num_train: int, first: int, full_at: int) -> Callable[[int], int]:
    """Martens' auto-encoder batch schedule ``m_k = min(⌊2^{(k−1)/b}·m_1⌋, N)``.

    ``b = (K−1)/log2(N/m_1)``.

    ``k`` counts iterations from 1; the full batch ``N`` is reached at iteration ``K = full_at``
    (500 and ``m_1 = 1000`` in the K-FAC paper's code).

    Example:
        >>> sched = exponential_batch_schedule(1500, 100, 50)
        >>> sched(1), sched(50), sched(80)
        (100, 1500, 1500)
    """
    if num_train < 1 or first < 1 or full_at < 1:
        raise ValueError(
            "exponential_batch_schedule: num_train, first and full_at must be positive, got "
            f"{num_train}, {first}, {full_at}"
        )
    if first >= num_train or full_at == 1:
        return lambda k: num_train
    b = (full_at - 1) / math.log2(num_train / first)

    def schedule(k: int) -> int:
        return min(int(2 ** ((k - 1) / b) * first + 1e-9), num_train)

    return schedule


def _batches(n: int, batch_size: BatchSize, generator: torch.Generator,
             device: torch.device) -> Iterator[Tensor]:
    """Index tensors of successive mini-batches: shuffled epochs, no example twice per epoch."""
    perm = torch.randperm(n, generator=generator).to(device)
    pos = 0
    k = 1
    while True:
        m = batch_size(k) if callable(batch_size) else batch_size
        if not 1 <= m <= n:
            raise ValueError(f"train: batch size {m} at iteration {k} must lie in [1, {n}]")
        if m == n:
            yield torch.arange(n, device=device)
        else:
            if pos + m > n:
                perm = torch.randperm(n, generator=generator).to(device)
                pos = 0
            yield perm[pos:pos + m]
            pos += m
        k += 1


def _error(output: Tensor, target: Tensor, task: str) -> float:
    if task == "classification":
        return float((output.argmax(dim=1) != target).float().mean())
    return float((torch.sigmoid(output) - target).pow(2).reshape(output.shape[0], -1)
                 .sum(dim=1).mean())


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
             task: str, *, chunk: int = 4096) -> tuple[float, float]:
    """``(loss, error)`` of ``model`` on ``(x, y)`` in eval mode (chunked; loss as mean of
    ``loss_fn`` over chunks weighted by size, i.e. exact for mean-reduced losses).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> loss, err = evaluate(net, torch.nn.CrossEntropyLoss(), torch.zeros(4, 2),
        ...                      torch.zeros(4, dtype=torch.long), "classification")
        >>> 0.0 <= err <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    try:
        total_loss = 0.0
        total_err = 0.0
        n = x.shape[0]
        for start in range(0, n, chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            out = model(xb)
            total_loss += float(loss_fn(out, yb)) * xb.shape[0]
            total_err += _error(out, yb, task) * xb.shape[0]
        return total_loss / n, total_err / n
    finally:
        model.train(was_training)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    opt_factory: Callable[[nn.Module, Callable], Any],
    model_factory: Callable[[], nn.Module],
    data: Dataset,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    iterations: int | None = None,
    epochs: float | None = None,
    batch_size: BatchSize = 128,
    eval_every: int = 10,
    time_budget: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    eval_train_size: int | None = None,
    target_loss: float | None = None,
    stop_at_target: bool = False,
    divergence_factor: float = 100.0,
    amp: str | None = None,
) -> TrainResult:
    """Train ``model_factory()`` with ``opt_factory(model, loss_fn)`` and trace it.

    Args:
        opt_factory: ``(model, loss_fn) -> optimizer`` with ``opt.step(inputs, targets)``.
        model_factory: Builds the network (called after ``torch.manual_seed(seed)``).
        data: Data set; moved once to ``device``.
        loss_fn: Training loss ``loss_fn(output, target)``.
        iterations: Number of optimizer steps (or give ``epochs``).
        epochs: Number of passes at a constant ``batch_size`` (converted to iterations).
        batch_size: Constant mini-batch size or a schedule ``k -> m_k`` (``k`` from 1).
        eval_every: Evaluate every this many iterations (and at 0 and at the end).
        time_budget: Stop after this many seconds of optimizer steps.
        device: Device for model and data.
        seed: Seeds the model init, mini-batch order and the optimizers' sampling.
        eval_train_size: Evaluate the training loss on this many (fixed) training examples.
        target_loss: Record the first evaluation with train loss ``<=`` this (iteration, time).
        stop_at_target: Stop once the target is reached.
        divergence_factor: Stop as diverged when the training loss exceeds this times the
            initial one, or is not finite.
        amp: ``None`` or ``"bf16"`` (``torch.autocast`` around every step; optimizers keep
            their own factor precision).

    Returns:
        :class:`TrainResult`; the summary has ``iterations``, ``train_time_s``,
        ``final_train_loss``, ``final_train_error``, ``final_val_loss``, ``final_val_error``,
        ``best_train_loss``, ``best_val_error``, ``diverged``, ``reached_target``,
        ``iters_to_target``, ``time_to_target`` (NaN when not reached), ``skipped_steps``,
        the optimizer counters as ``n_<counter>``, and ``n_warnings`` / ``first_warning``
        (warnings raised during the steps are recorded there instead of printed).
    """
    device = torch.device(device)
    if (iterations is None) == (epochs is None):
        raise ValueError("train: give exactly one of iterations= and epochs=")
    n = data.num_train
    if epochs is not None:
        if callable(batch_size):
            raise ValueError("train: epochs= needs a constant batch_size")
        iterations = max(1, math.ceil(epochs * n / batch_size))
    if iterations is None or iterations < 0:
        raise ValueError(f"train: iterations must be >= 0, got {iterations}")
    if eval_every < 1:
        raise ValueError(f"train: eval_every must be >= 1, got {eval_every}")
    if amp not in (None, "bf16"):
        raise ValueError(f"train: amp must be None or 'bf16', got {amp!r}")
    x_train, y_train = (t.to(device) for t in data.train)  # no-op when already there
    x_test, y_test = (t.to(device) for t in data.test)
    task = "classification" if data.task == "classification" else "reconstruction"
    if eval_train_size is not None and eval_train_size < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[
            :eval_train_size].to(device)
        x_eval, y_eval = x_train[idx], y_train[idx]
    else:
        x_eval, y_eval = x_train, y_train

    torch.manual_seed(seed)
    model = model_factory().to(device)
    model.train()
    with warnings.catch_warnings(record=True) as setup_warnings:
        warnings.simplefilter("always")
        opt = opt_factory(model, loss_fn)
    batches = _batches(n, batch_size, torch.Generator().manual_seed(seed), device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16"
                else nullcontext())

    trace: list[dict[str, Any]] = []
    elapsed = 0.0
    reached: tuple[int, float] | None = None
    diverged = False
    initial = math.nan
    recent: list[float] = []
    m = 0

    def log(k: int) -> float:
        nonlocal reached
        train_loss, train_err = evaluate(model, loss_fn, x_eval, y_eval, task)
        val_loss, val_err = evaluate(model, loss_fn, x_test, y_test, task)
        trace.append({
            "iteration": k, "time_s": elapsed, "train_loss": train_loss,
            "train_error": train_err, "val_loss": val_loss, "val_error": val_err,
            "batch_size": m,
            "minibatch_loss": sum(recent) / len(recent) if recent else math.nan,
        })
        recent.clear()
        if (target_loss is not None and reached is None and math.isfinite(train_loss)
                and train_loss <= target_loss):
            reached = (k, elapsed)
        return train_loss

    initial = log(0)
    k = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # optimizer warnings are counted into the summary
        while k < iterations:
            idx = next(batches)
            m = int(idx.numel())
            xb, yb = x_train[idx], y_train[idx]
            _sync(device)
            start = time.perf_counter()
            with autocast:
                loss = opt.step(xb, yb)
            _sync(device)
            elapsed += time.perf_counter() - start
            k += 1
            value = float(loss)
            recent.append(value)
            stop = False
            if not math.isfinite(value):
                diverged = stop = True
            if k % eval_every == 0 or k == iterations or stop:
                current = log(k)
                if not math.isfinite(current) or current > divergence_factor * max(initial, 1e-12):
                    diverged = stop = True
            if time_budget is not None and elapsed >= time_budget:
                if trace[-1]["iteration"] != k:
                    log(k)
                stop = True
            if stop_at_target and reached is not None:
                stop = True
            if stop:
                break

    last = trace[-1]
    finite_train = [r["train_loss"] for r in trace if math.isfinite(r["train_loss"])]
    finite_val = [r["val_error"] for r in trace if math.isfinite(r["val_error"])]
    counters = dict(getattr(opt, "counters", {}) or {})
    summary: dict[str, Any] = {
        "iterations": k,
        "train_time_s": elapsed,
        "final_train_loss": last["train_loss"],
        "final_train_error": last["train_error"],
        "final_val_loss": last["val_loss"],
        "final_val_error": last["val_error"],
        "best_train_loss": min(finite_train) if finite_train else math.nan,
        "best_train_error": min((r["train_error"] for r in trace
                                 if math.isfinite(r["train_error"])), default=math.nan),
        "best_val_error": min(finite_val) if finite_val else math.nan,
        "diverged": diverged,
        "reached_target": reached is not None,
        "iters_to_target": reached[0] if reached else math.nan,
        "time_to_target": reached[1] if reached else math.nan,
        "skipped_steps": int(counters.get("skipped_steps", 0)),
        "n_warnings": len(setup_warnings) + len(caught),
        "first_warning": str((setup_warnings + caught)[0].message)[:200]
        if setup_warnings or caught else "",
    }
    summary.update({f"n_{name}": int(v) for name, v in counters.items()
                    if isinstance(v, int | float) and name != "skipped_steps"})
    return TrainResult(trace, summary)
