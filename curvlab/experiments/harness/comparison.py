"""Optimizer-comparison sweeps: methods × hyperparameter grids × seeds on training problems.

Shared by the deep auto-encoder, CNN classification and time-to-target studies. A
:class:`TrainingProblem` bundles data, a model builder, a loss and the training budget; a
:class:`~curvlab.experiments.harness.optimizers.Method` names an optimizer and its grid.
:func:`run_comparison` trains every (problem, method, configuration, seed) through the resumable
:func:`~curvlab.experiments.harness.runner.run_all`, picks each method's best configuration (lowest
seed-mean final training loss), and lists methods that could not run with the reason.

Run configs look like ``{"problem": ..., "size": "quick", "method": label, "optimizer": name,
"hp": {grid point}, "fixed": {...}, "budget": {...}}``, so the CSV columns are ``problem,
method, optimizer, hp.lr, fixed.weight_decay, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from curvlab.data import Dataset
from curvlab.experiments.harness.optimizers import Method, build_optimizer, unavailable_reason
from curvlab.experiments.harness.registry import Context
from curvlab.experiments.harness.runner import Run, RunResult, run_all
from curvlab.experiments.harness.selection import first_crossing, select_best
from curvlab.experiments.harness.training import BatchSize, train

__all__ = [
    "ComparisonResult",
    "TrainingProblem",
    "best_methods",
    "build_problems",
    "method_value",
    "not_run_notes",
    "run_comparison",
]


@dataclass
class TrainingProblem:
    """Data, model and budget of one comparison problem.

    Attributes:
        name: Short name (a column of every result row).
        data: The data set (already on the experiment's device).
        model_factory: Builds a fresh network (seeded by :func:`train`).
        loss_fn: Training loss.
        iterations: Maximum optimizer steps.
        batch_size: Constant size or schedule ``k -> m_k``.
        batch_label: JSON-friendly description of ``batch_size`` (part of the run key).
        eval_every: Evaluation interval (iterations).
        time_budget: Seconds of optimizer time per run (``None`` = iterations only).
        eval_train_size: Training examples used to evaluate the training loss (``None`` = all).
        size: ``"quick"`` or ``"full"`` (part of the run key).
    """

    name: str
    data: Dataset
    model_factory: Callable[[], nn.Module]
    loss_fn: Callable
    iterations: int
    batch_size: BatchSize
    batch_label: Any
    eval_every: int = 10
    time_budget: float | None = None
    eval_train_size: int | None = None
    size: str = "quick"

    def budget(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "batch": self.batch_label,
                "eval_every": self.eval_every, "time_budget": self.time_budget}


@dataclass
class ComparisonResult:
    """Everything a comparison produced.

    Attributes:
        summary: One row per run (all configurations and seeds).
        trace: Evaluation-point rows of every run.
        best: Rows of each (problem, method)'s best configuration (all its seeds).
        not_run: ``{(problem, method label): reason}`` for methods that could not run.
    """

    summary: pd.DataFrame
    trace: pd.DataFrame
    best: pd.DataFrame
    not_run: dict[tuple[str, str], str] = field(default_factory=dict)

    def best_trace(self) -> pd.DataFrame:
        """Trace rows of the best configuration of every (problem, method)."""
        if self.best.empty or self.trace.empty:
            return self.trace.iloc[0:0]
        return self.trace[self.trace["key"].isin(set(self.best["key"]))].reset_index(drop=True)

    def best_table(self, score: str = "final_train_error") -> pd.DataFrame:
        """Per (problem, method): best hyperparameters, seed-mean results, and "not run" rows."""
        rows: list[dict[str, Any]] = []
        hp_cols = [c for c in self.best.columns if c.startswith("hp.")]
        for (problem, method), grp in self.best.groupby(["problem", "method"], sort=False):
            row: dict[str, Any] = {"problem": problem, "method": method, "status": "ran"}
            row["setting"] = ", ".join(
                f"{c[3:]}={grp[c].iloc[0]}" for c in hp_cols
                if pd.notna(grp[c].iloc[0]) and grp[c].iloc[0] != "-"
            )
            for col in ("final_train_loss", "final_train_error", "final_val_error",
                        "best_val_error", "iterations", "train_time_s"):
                if col in grp:
                    row[col] = float(pd.to_numeric(grp[col], errors="coerce").mean())
            row["diverged"] = bool("diverged" in grp and grp["diverged"].astype(bool).any())
            row["seeds"] = len(grp)
            rows.append(row)
        for (problem, method), reason in self.not_run.items():
            rows.append({"problem": problem, "method": method, "status": f"not run: {reason}"})
        table = pd.DataFrame(rows)
        if not table.empty and score in table:
            table = table.sort_values(["problem", score], na_position="last", kind="stable")
        return table.reset_index(drop=True)


    def first_order_targets(self, value: str = "train_error") -> dict[str, float]:
        """Per problem: the lowest seed-mean final ``value`` among first-order methods (the
        target of the time-to-target comparison); problems without a first-order run are absent.
        """
        targets: dict[str, float] = {}
        if self.best.empty:
            return targets
        fo = self.best[self.best["first_order"].astype(bool)]
        for problem, grp in fo.groupby("problem"):
            finals = grp.groupby("method")[f"final_{value}"].mean()
            finals = finals[finals.apply(math.isfinite)]
            if len(finals):
                targets[str(problem)] = float(finals.min())
        return targets

    def time_to_target(self, targets: dict[str, float], value: str = "train_error"
                       ) -> pd.DataFrame:
        """Per (problem, method, seed): iterations and optimizer seconds until the best
        configuration's ``value`` first drops to ``targets[problem]`` (NaN if never)."""
        rows = []
        trace = self.best_trace()
        for (problem, method, seed), grp in trace.groupby(["problem", "method", "seed"],
                                                          sort=False):
            if problem not in targets:
                continue
            grp = grp.sort_values("iteration")
            rows.append({"problem": problem, "method": method, "seed": seed,
                         "target": targets[problem],
                         "iters_to_target": first_crossing(grp, targets[problem], value=value,
                                                           at="iteration"),
                         "time_to_target_s": first_crossing(grp, targets[problem], value=value,
                                                            at="time_s")})
        return pd.DataFrame(rows, columns=["problem", "method", "seed", "target",
                                           "iters_to_target", "time_to_target_s"])


def run_comparison(
    experiment: str,
    problems: Sequence[TrainingProblem],
    methods: Sequence[Method] | Callable[[TrainingProblem], Sequence[Method]],
    ctx: Context,
    *,
    seeds: Sequence[int] = (0,),
    score: str = "final_train_loss",
) -> ComparisonResult:
    """Train every method configuration on every problem and seed (resumable).

    ``methods`` is a list or a function of the problem (e.g. damping scaled to the input size).
    """
    by_name = {p.name: p for p in problems}
    runs: list[Run] = []
    not_run: dict[tuple[str, str], str] = {}
    method_of: dict[tuple[str, str], Method] = {}
    for problem in problems:
        plist = methods(problem) if callable(methods) else methods
        for method in plist:
            method_of[(problem.name, method.label)] = method
            reason = unavailable_reason(method, problem.model_factory, problem.loss_fn)
            if reason is not None:
                not_run[(problem.name, method.label)] = reason
                continue
            for hp in method.grid_points():
                for seed in seeds:
                    runs.append(Run(experiment, {
                        "problem": problem.name, "size": problem.size, "method": method.label,
                        "optimizer": method.optimizer, "first_order": method.first_order,
                        "hp": hp, "fixed": dict(method.fixed), "budget": problem.budget(),
                    }, seed=seed))

    def fn(run: Run) -> RunResult:
        problem = by_name[run.config["problem"]]
        method = method_of[(problem.name, run.config["method"])]
        hp = {**run.config["fixed"], **run.config["hp"]}
        result = train(
            lambda model, loss_fn: build_optimizer(method.optimizer, model, loss_fn, hp),
            problem.model_factory, problem.data, loss_fn=problem.loss_fn,
            iterations=problem.iterations, batch_size=problem.batch_size,
            eval_every=problem.eval_every, time_budget=problem.time_budget, device=ctx.device,
            seed=run.seed, eval_train_size=problem.eval_train_size,
        )
        return RunResult(result.summary, result.trace)

    summary, trace = run_all(runs, fn, ctx.out_dir, desc=experiment, progress=ctx.progress,
                             device=ctx.device)
    best = (select_best(summary, ["problem", "method"], score=score) if not summary.empty
            else summary)
    return ComparisonResult(summary, trace, best, not_run)


def build_problems(builders: Iterable[tuple[str, Callable[[], TrainingProblem]]]
                   ) -> tuple[list[TrainingProblem], dict[str, str]]:
    """Call each ``(name, builder)``; a builder whose data files are missing (``OSError``) is
    skipped with the reason. Returns ``(problems, {name: "data not available: ..."})``.

    Example:
        >>> def missing():
        ...     raise FileNotFoundError("no CIFAR-10 under CURVLAB_DATA")
        >>> build_problems([("cifar", missing)])
        ([], {'cifar': 'data not available: no CIFAR-10 under CURVLAB_DATA'})
    """
    built: list[TrainingProblem] = []
    skipped: dict[str, str] = {}
    for name, build in builders:
        try:
            built.append(build())
        except (FileNotFoundError, OSError) as err:
            skipped[name] = f"data not available: {err}"
    return built, skipped


def not_run_notes(result: ComparisonResult, skipped: dict[str, str]) -> str:
    """``"problem/method: not run: reason; problem: not run: reason"`` for an Outcome's notes.

    Example:
        >>> res = ComparisonResult(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
        ...                        {("p", "K-FAC"): "ImportError: x"})
        >>> not_run_notes(res, {"q": "data not available: y"})
        'p/K-FAC: not run: ImportError: x; q: not run: data not available: y'
    """
    notes = [f"{p}/{m}: not run: {r}" for (p, m), r in result.not_run.items()]
    notes += [f"{p}: not run: {r}" for p, r in skipped.items()]
    return "; ".join(notes)


def method_value(table: pd.DataFrame, problem: str, method: str, column: str) -> float:
    """``column`` of ``method`` on ``problem`` in a :meth:`ComparisonResult.best_table`;
    ``+inf`` when the method did not run there or diverged (so that it loses comparisons).

    Example:
        >>> t = pd.DataFrame({"problem": ["p", "p"], "method": ["a", "b"], "status": "ran",
        ...                   "diverged": [False, True], "final_train_loss": [0.5, 0.1]})
        >>> method_value(t, "p", "a", "final_train_loss"), method_value(t, "p", "b", "x")
        (0.5, inf)
    """
    if table.empty:
        return math.inf
    row = table[(table["problem"] == problem) & (table["method"] == method)
                & (table["status"] == "ran")]
    if row.empty or bool(row["diverged"].iloc[0]):
        return math.inf
    return float(row[column].iloc[0])


def best_methods(table: pd.DataFrame, problems: Sequence[str], column: str,
                 label: str = "best") -> dict[str, str]:
    """Key numbers of a comparison: per problem, the method with the lowest ``column`` among
    the rows that ran, as ``{"<problem> <label>": "<method> <value, 3 digits>"}``.

    Example:
        >>> t = pd.DataFrame({"problem": ["p", "p"], "method": ["a", "b"], "status": "ran",
        ...                   "final_val_error": [0.25, 0.125]})
        >>> best_methods(t, ["p", "q"], "final_val_error", "best val err")
        {'p best val err': 'b 0.125'}
    """
    key: dict[str, str] = {}
    if table.empty or column not in table:
        return key
    for p in problems:
        ran = table[(table["problem"] == p) & (table["status"] == "ran")]
        if not ran.empty:
            best = ran.sort_values(column).iloc[0]
            key[f"{p} {label}"] = f"{best['method']} {best[column]:.3g}"
    return key
