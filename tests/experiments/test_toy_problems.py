"""CurveBall toy-problem experiment: run function, selection, table, claims, tiny end-to-end."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from curvlab.experiments.harness.registry import make_context
from curvlab.experiments.harness.runner import Run
from curvlab.experiments.studies import toy_problems as tp

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    cfg = {"problem": "rosenbrock", "noise_scale": 0.0, "optimizer": "curveball",
           "hyper": tp.CURVEBALL_CONFIGS["rosenbrock"], "budget": 100, "early_stop": True,
           "trace": True}
    cfg.update(kw)
    return cfg


def test_settings_and_grids():
    quick, full = tp.toy_settings(False), tp.toy_settings(True)
    assert full.repeats == 100 and full.rosenbrock_budget == 5000
    assert full.rahimi_recht_budget == 1000
    assert quick.repeats < full.repeats
    assert len(tp.SGD_GRID) == 24 and len(tp.ADAM_GRID) == 32
    assert tp.toy_settings(False, repeats=3).repeats == 3


def test_run_one_curveball_rosenbrock_with_trace():
    res = tp.run_one(Run(tp.EXPERIMENT, _cfg(noise_scale=3.0), seed=1))
    assert res.summary["solved"] and res.summary["iterations_to_tol"] < 100
    assert res.trace[0]["iteration"] == 0 and {"u", "v", "loss"} <= set(res.trace[0])
    assert len(res.trace) == res.summary["iterations_run"]


def test_run_one_stops_on_divergence():
    cfg = _cfg(optimizer="sgd", hyper={"lr": 0.1, "momentum": 0.99}, noise_scale=3.0,
               early_stop=False, trace=False)
    res = tp.run_one(Run(tp.EXPERIMENT, cfg, seed=0))
    assert res.summary["diverged"] and res.summary["score"] == math.inf
    assert not res.summary["solved"]


def test_best_settings_and_summarize():
    runs = [(Run(tp.EXPERIMENT, {"lr": lr}, seed=0), {"lr": lr}) for lr in (0.1, 0.01)]
    grid = pd.DataFrame({"key": [r.key for r, _ in runs], "problem": ["rosenbrock"] * 2,
                         "noise_scale": [0.0, 0.0], "optimizer": ["sgd"] * 2,
                         "score": [float("nan"), 0.5]})
    assert tp.best_settings(grid, runs) == {("rosenbrock", 0.0, "sgd"): {"lr": 0.01}}
    rep = pd.DataFrame({"problem": ["rosenbrock"] * 3, "noise_scale": [0.0] * 3,
                        "optimizer": ["sgd"] * 3, "solved": [True, True, False],
                        "iterations_to_tol": [10.0, 20.0, float("nan")]})
    row = tp.summarize(rep).iloc[0]
    assert row["solved_pct"] == pytest.approx(200 / 3)
    assert (row["iters_mean"], row["iters_std"]) == (15.0, 5.0)


def test_claims_logic():
    table = pd.DataFrame({
        "problem": ["P"] * 3, "optimizer": ["CurveBall", "SGD+momentum", "Adam"],
        "runs": [5] * 3, "solved_pct": [100.0, 0.0, 100.0], "iters_mean": [10.0, math.nan, 9.0],
        "iters_std": [1.0, math.nan, 1.0],
    })
    (claim,) = tp._claims(table)
    assert not claim.holds  # Adam is faster here
    table.loc[2, "iters_mean"] = 50.0
    assert tp._claims(table)[0].holds


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "toy_settings",
                        lambda full, repeats=None: tp.ToySettings((0.0,), 60, 40, 20, 2))
    monkeypatch.setattr(tp, "SGD_GRID", [{"lr": 1e-3, "momentum": 0.9}])
    monkeypatch.setattr(tp, "ADAM_GRID", [{"lr": 1e-2, "beta1": 0.9, "beta2": 0.999}])
    ctx = make_context(tmp_path, device="cpu")
    out = tp.curveball_toy(ctx)
    assert set(out.table["optimizer"]) == set(tp.OPTIMIZER_LABELS.values())
    assert len(out.table) == 2 * 5
    assert all(p.exists() for p in out.figures)
    lines = (tmp_path / tp.EXPERIMENT / "summary.csv").read_text().count("\n")
    out2 = tp.curveball_toy(ctx)  # resumes: nothing re-run
    assert (tmp_path / tp.EXPERIMENT / "summary.csv").read_text().count("\n") == lines
    pd.testing.assert_frame_equal(out.table, out2.table)
