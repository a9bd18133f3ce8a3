r"""CurveBall toy problems (Table 1 / Figure 1 analogue): stochastic Rosenbrock and Rahimi–Recht.

Protocol (``albanie/mcnToyOptim`` as summarised in the CurveBall spec §6.1–6.2; differences in
``papers/curveball.md``):

* Problems: Rosenbrock ``f_ε = (1-u)² + 100 ε² (v-u²)²`` with ``ε = s·U[0,1]`` drawn once per
  iteration (deterministic: ``ε ≡ 1``), start ``(-0.25,-0.25) + δ(1,1)``, ``δ ~ U[-0.25,0.25]``;
  the CurveBall-variant Rahimi–Recht net (6→10→10, full batch of 1000, mean squared error).
* Convergence: first iteration ``t`` with ``f(θ_t) < 1e-4``, where ``f`` is the *noise-free*
  objective (ε = 1; the full-batch loss for Rahimi–Recht); % solved and mean ± std of ``t`` over
  solved runs.
* SGD (+momentum) and Adam: one run per point of the paper's grid (lr ∈ {1e-1, 5e-2, 1e-2,
  5e-3, 1e-3, 5e-4, 1e-4, 5e-5} × momentum ∈ {0.9, 0.95, 0.99}; Adam β1 ∈ {0.9, 0.99} × β2 ∈
  {0.99, 0.999}) on seed 0; best = lowest mean noise-free loss over the last 9 iterations; the
  best setting is then repeated over the seeds.
* CurveBall untuned (``exps/standardConfigs.m``): automatic ρ/β, λ fixed (auto-λ off); Rosenbrock
  λ = 0.1, lr = 0.5; Rahimi–Recht λ = 1, lr = 1 (both exposed via ``CURVEBALL_CONFIGS``).
* Dense Levenberg–Marquardt and BFGS (:mod:`curvlab.optim.dense`) in the roles of MATLAB's
  ``lsqnonlin`` / ``fminunc``; their line searches reuse the iteration's noise draw.

Quick mode (default): noise scales ``s ∈ {0 (deterministic), 1, 3}``, budgets 500 (Rosenbrock) /
300 (Rahimi–Recht) iterations, grid runs of 100 iterations, 5 repeats. Full mode: ``s ∈ {0, 1,
2, 3, 4}``, 5000 / 1000 iterations (grid at the full budget), 100 repeats.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from curvlab.experiments.harness.optimizers import build_optimizer
from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.runner import Run, RunResult, read_results, run_all
from curvlab.experiments.harness.selection import select_best
from curvlab.experiments.harness.threads import single_thread
from curvlab.experiments.studies.toy_figures import draw_figure1
from curvlab.problems.rahimi_recht import make_rahimi_recht
from curvlab.problems.rosenbrock import StochasticRosenbrock, rosenbrock

__all__ = [
    "ADAM_GRID",
    "CURVEBALL_CONFIGS",
    "EXPERIMENT",
    "OPTIMIZER_LABELS",
    "SGD_GRID",
    "TOLERANCE",
    "ToySettings",
    "best_settings",
    "curveball_toy",
    "load_traces",
    "plot_figure1",
    "run_one",
    "summarize",
    "toy_settings",
]

EXPERIMENT = "curveball-toy"
TOLERANCE = 1e-4
LEARNING_RATES = (1e-1, 5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4, 5e-5)
#: SGD grid: lr × momentum (spec §6.1, ``grid_search_optim.m`` 'final').
SGD_GRID = [{"lr": lr, "momentum": m} for lr, m in itertools.product(LEARNING_RATES,
                                                                      (0.9, 0.95, 0.99))]
#: Adam grid: lr × β1 × β2.
ADAM_GRID = [{"lr": lr, "beta1": b1, "beta2": b2}
             for lr, b1, b2 in itertools.product(LEARNING_RATES, (0.9, 0.99), (0.99, 0.999))]
#: Untuned CurveBall settings per problem (``exps/standardConfigs.m``).
CURVEBALL_CONFIGS = {
    "rosenbrock": {"lambd": 0.1, "lr": 0.5, "auto_lambda": False},
    "rahimi-recht": {"lambd": 1.0, "lr": 1.0, "auto_lambda": False},
}
OPTIMIZER_LABELS = {"sgd": "SGD+momentum", "adam": "Adam", "lm": "LM (dense)",
                    "bfgs": "BFGS (dense)", "curveball": "CurveBall"}


@dataclass(frozen=True)
class ToySettings:
    """Sizes of one run of the experiment (quick or full)."""

    noise_scales: tuple[float, ...]
    rosenbrock_budget: int
    rahimi_recht_budget: int
    grid_budget: int | None  # None: same as the problem's budget
    repeats: int

    def problems(self) -> list[dict[str, Any]]:
        """Problem configs: Rosenbrock at each noise scale (0 = deterministic), Rahimi–Recht."""
        probs = [{"problem": "rosenbrock", "noise_scale": float(s)} for s in self.noise_scales]
        return [*probs, {"problem": "rahimi-recht", "noise_scale": 0.0}]

    def budget(self, problem: str) -> int:
        return self.rosenbrock_budget if problem == "rosenbrock" else self.rahimi_recht_budget


def toy_settings(full: bool, repeats: int | None = None) -> ToySettings:
    """Quick (CPU, < 1 min) or full (paper-size) settings; ``repeats`` overrides the default.

    Example:
        >>> toy_settings(False).repeats, toy_settings(True).rosenbrock_budget
        (5, 5000)
    """
    if full:
        s = ToySettings((0.0, 1.0, 2.0, 3.0, 4.0), 5000, 1000, None, 100)
    else:
        s = ToySettings((0.0, 1.0, 3.0), 500, 300, 100, 5)
    if repeats is not None:
        s = ToySettings(s.noise_scales, s.rosenbrock_budget, s.rahimi_recht_budget,
                        s.grid_budget, repeats)
    return s


# ------------------------------------------------------------------------------------------
# one run


def run_one(run: Run) -> RunResult:
    """Execute one toy run (config keys: problem, noise_scale, optimizer, hyper, budget,
    early_stop, trace).

    Example:
        >>> cfg = {"problem": "rosenbrock", "noise_scale": 0.0, "optimizer": "curveball",
        ...        "hyper": CURVEBALL_CONFIGS["rosenbrock"], "budget": 200,
        ...        "early_stop": True, "trace": False}
        >>> res = run_one(Run(EXPERIMENT, cfg, seed=0))
        >>> bool(res.summary["solved"])
        True
    """
    cfg = run.config
    problem, name = cfg["problem"], cfg["optimizer"]
    budget, early_stop, want_trace = int(cfg["budget"]), bool(cfg["early_stop"]), cfg["trace"]
    gen = torch.Generator().manual_seed(run.seed)
    if problem == "rosenbrock":
        prob = StochasticRosenbrock(cfg["noise_scale"] or None, x0_noise=0.5)
        model = prob.make_model(prob.initial_point(gen))
        loss_fn = prob.loss_fn

        def next_batch():
            return prob.draw_batch(gen)

        def true_loss(m: torch.nn.Module) -> float:
            return float(rosenbrock(m.theta.detach()))

        def point() -> dict[str, float]:
            u, v = model.theta.detach().tolist()
            return {"u": u, "v": v}
    elif problem == "rahimi-recht":
        rr = make_rahimi_recht("curveball", seed=run.seed)
        model, loss_fn = rr.model, rr.loss_fn

        def next_batch():
            return rr.x, rr.y

        true_loss = None  # full batch, deterministic: the step's own loss is f(θ_t)

        def point() -> dict[str, float]:
            return {}
    else:
        raise ValueError(f"unknown problem {problem!r}")
    hyper = dict(cfg["hyper"])
    if name == "curveball":  # the Rosenbrock "model" is a bare parameter vector
        hyper["engine"] = "functional" if problem == "rosenbrock" else "auto"
    opt = build_optimizer(name, model, loss_fn, hyper)

    losses: list[float] = []
    trace: list[dict[str, Any]] = []
    solved_at: int | None = None
    diverged = False
    with single_thread():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for it in range(budget):
                # f_t: noise-free objective at the iterate before step t
                f = true_loss(model) if true_loss is not None else math.nan
                before = point() if want_trace else {}
                step_loss = float(opt.step(*next_batch()))
                if true_loss is None:
                    f = step_loss
                losses.append(f)
                if want_trace:
                    trace.append({"iteration": it, "loss": f, **before})
                if solved_at is None and f < TOLERANCE:
                    solved_at = it
                    if early_stop:
                        break
                if not (math.isfinite(f) and math.isfinite(step_loss)) or f > 1e10:
                    diverged = True
                    break
    tail = losses[-9:]
    score = float(np.mean(tail)) if tail and not diverged else math.inf
    return RunResult(
        {
            "solved": solved_at is not None,
            "iterations_to_tol": float(solved_at) if solved_at is not None else math.nan,
            "final_loss": losses[-1] if losses else math.nan,
            "score": score,
            "diverged": diverged,
            "iterations_run": len(losses),
            **{f"n_{k}": v for k, v in opt.counters.items()},
        },
        trace or None,
    )


# ------------------------------------------------------------------------------------------
# the experiment


def _problem_label(problem: str, noise_scale: float) -> str:
    if problem == "rahimi-recht":
        return "Rahimi-Recht"
    if not noise_scale:
        return "Rosenbrock (deterministic)"
    return f"Rosenbrock U[0,{noise_scale:g}]"


def _grid_runs(settings: ToySettings) -> list[tuple[Run, dict]]:
    runs = []
    for prob in settings.problems():
        budget = settings.grid_budget or settings.budget(prob["problem"])
        for name, grid in (("sgd", SGD_GRID), ("adam", ADAM_GRID)):
            for hyper in grid:
                cfg = {**prob, "stage": "grid", "optimizer": name, "hyper": hyper,
                       "budget": budget, "early_stop": False, "trace": False}
                runs.append((Run(EXPERIMENT, cfg, seed=0), hyper))
    return runs


def best_settings(grid_summary: pd.DataFrame, grid_runs: list[tuple[Run, dict]]) -> dict:
    """``{(problem, noise_scale, optimizer): hyper}`` with the lowest grid score (mean
    noise-free loss over the last 9 iterations; diverged runs score ``inf``; ties go to the
    first grid point). Every grid run (seed 0) is its own setting.

    Example:
        >>> runs = [(Run(EXPERIMENT, {"lr": lr}, seed=0), {"lr": lr}) for lr in (0.1, 0.01)]
        >>> grid = pd.DataFrame({"key": [r.key for r, _ in runs], "problem": "rosenbrock",
        ...                      "noise_scale": 0.0, "optimizer": "sgd", "score": [1.0, 0.5]})
        >>> best_settings(grid, runs)
        {('rosenbrock', 0.0, 'sgd'): {'lr': 0.01}}
    """
    hyper_of = {run.key: hyper for run, hyper in grid_runs}
    by = ["problem", "noise_scale", "optimizer"]
    best = select_best(grid_summary, by, score="score", hyper=["key"])
    return {(problem, float(scale), name): hyper_of[key]
            for problem, scale, name, key in best[[*by, "key"]].itertuples(index=False)}


def _repeat_runs(settings: ToySettings, best: dict) -> list[Run]:
    runs = []
    for prob in settings.problems():
        budget = settings.budget(prob["problem"])
        methods = {
            "sgd": best[(prob["problem"], prob["noise_scale"], "sgd")],
            "adam": best[(prob["problem"], prob["noise_scale"], "adam")],
            "lm": {},
            "bfgs": {},
            "curveball": CURVEBALL_CONFIGS[prob["problem"]],
        }
        for name, hyper in methods.items():
            for seed in range(settings.repeats):
                cfg = {**prob, "stage": "repeat", "optimizer": name, "hyper": hyper,
                       "budget": budget, "early_stop": True, "trace": seed == 0}
                runs.append(Run(EXPERIMENT, cfg, seed=seed))
    return runs


def summarize(repeat_summary: pd.DataFrame, best: dict | None = None) -> pd.DataFrame:
    """Table 1 analogue: per problem and optimizer, % solved and iterations (mean ± std over
    solved runs).

    Example:
        >>> df = pd.DataFrame({"problem": ["rosenbrock"] * 2, "noise_scale": [0.0, 0.0],
        ...                    "optimizer": ["curveball"] * 2, "solved": [True, False],
        ...                    "iterations_to_tol": [10.0, float("nan")]})
        >>> summarize(df)[["solved_pct", "iters_mean"]].values.tolist()
        [[50.0, 10.0]]
    """
    rows = []
    for (problem, scale, name), grp in repeat_summary.groupby(
            ["problem", "noise_scale", "optimizer"], sort=False):
        solved = grp["solved"].astype(bool)
        iters = grp.loc[solved, "iterations_to_tol"].astype(float)
        hyper = "" if best is None else ", ".join(
            f"{k}={v:g}" for k, v in best.get((problem, float(scale), name), {}).items())
        if name == "curveball":
            hyper = ", ".join(f"{k}={v}" for k, v in CURVEBALL_CONFIGS[problem].items())
        rows.append({
            "problem": _problem_label(problem, float(scale)),
            "optimizer": OPTIMIZER_LABELS.get(name, name),
            "runs": len(grp),
            "solved_pct": 100.0 * float(solved.mean()),
            "iters_mean": float(iters.mean()) if len(iters) else math.nan,
            "iters_std": float(iters.std(ddof=0)) if len(iters) else math.nan,
            "hyper": hyper,
        })
    return pd.DataFrame(rows)


def _claims(table: pd.DataFrame) -> list[Claim]:
    claims = []
    for problem, grp in table.groupby("problem", sort=False):
        by = grp.set_index("optimizer")
        cb = by.loc["CurveBall"]
        wins = []
        for other in ("SGD+momentum", "Adam"):
            o = by.loc[other]
            if o["solved_pct"] == 0:
                wins.append(cb["solved_pct"] > 0)
            else:
                wins.append(cb["solved_pct"] >= o["solved_pct"]
                            and cb["iters_mean"] < o["iters_mean"])
        detail = "; ".join(
            f"{name}: {by.loc[name, 'solved_pct']:.0f}% solved, "
            f"{by.loc[name, 'iters_mean']:.1f} ± {by.loc[name, 'iters_std']:.1f} it"
            for name in ("CurveBall", "SGD+momentum", "Adam"))
        claims.append(Claim(f"{problem}: CurveBall needs fewer iterations than tuned SGD and Adam",
                            all(wins), detail))
    for problem in ("Rosenbrock (deterministic)", "Rahimi-Recht"):
        row = table[(table["problem"] == problem) & (table["optimizer"] == "CurveBall")]
        if len(row):
            pct = float(row["solved_pct"].iloc[0])
            claims.append(Claim(f"{problem}: untuned CurveBall solves every run", pct == 100.0,
                                f"{pct:.0f}% of {int(row['runs'].iloc[0])} runs"))
    return claims


def plot_figure1(trace: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Figure 1 analogue from the seed-0 traces: Rosenbrock trajectories on the contour and
    noise-free loss vs iteration per problem. Returns the PNG paths."""
    return draw_figure1(trace, out_dir, labels=OPTIMIZER_LABELS, tolerance=TOLERANCE,
                        title=_problem_label)


def load_traces(out_dir: str | Path) -> pd.DataFrame:
    """Per-iteration traces (seed 0 of every repeated setting) recorded under ``out_dir``."""
    _, trace = read_results(out_dir, EXPERIMENT)
    if trace.empty:
        return trace
    return trace[trace["stage"] == "repeat"].reset_index(drop=True)


@register(EXPERIMENT, title="CurveBall toy problems: stochastic Rosenbrock and Rahimi-Recht "
          "(Table 1, Figure 1)", paper="Henriques et al., Small steps and giant leaps (ICCV 2019)")
def curveball_toy(ctx: Context) -> Outcome:
    """Grid-search SGD/Adam, repeat the best settings, run untuned CurveBall, LM and BFGS.

    Returns the Table 1 analogue (:func:`summarize`), claims and Figure 1 analogue PNGs.
    """
    settings = toy_settings(ctx.full, ctx.seeds)
    grid = _grid_runs(settings)
    grid_summary, _ = run_all([r for r, _ in grid], run_one, ctx.out_dir, desc="toy grid",
                              progress=ctx.progress)
    best = best_settings(grid_summary, grid)
    repeats = _repeat_runs(settings, best)
    summary, trace = run_all(repeats, run_one, ctx.out_dir, desc="toy repeats",
                             progress=ctx.progress)
    table = summarize(summary, best)
    figures = plot_figure1(trace, ctx.experiment_dir(EXPERIMENT)) if not trace.empty else []
    cb = table[table["optimizer"] == "CurveBall"].set_index("problem")
    notes = (
        f"{'full' if ctx.full else 'quick'} mode: noise scales {settings.noise_scales}, budgets "
        f"{settings.rosenbrock_budget}/{settings.rahimi_recht_budget} iterations, grid budget "
        f"{settings.grid_budget or 'full'}, {settings.repeats} repeats. Convergence is tested "
        "on the noise-free objective; LM/BFGS line searches reuse the iteration's noise draw."
    )
    return Outcome(
        table, _claims(table), figures, notes,
        key_numbers={f"CurveBall iters {p}": round(float(r["iters_mean"]), 1)
                     for p, r in cb.iterrows()},
    )
