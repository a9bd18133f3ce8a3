"""Shared training loop, optimizer table, comparison sweeps and plotting helpers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from curvlab.data import Dataset
from curvlab.experiments.harness.comparison import (
    ComparisonResult,
    TrainingProblem,
    best_methods,
    build_problems,
    method_value,
    not_run_notes,
    run_comparison,
)
from curvlab.experiments.harness.optimizers import Method, build_optimizer, unavailable_reason
from curvlab.experiments.harness.plotting import heatmap_panels, line_panels, save
from curvlab.experiments.harness.registry import make_context
from curvlab.experiments.harness.selection import first_crossing, select_best
from curvlab.experiments.harness.training import evaluate, exponential_batch_schedule, train


def _blobs(n: int = 96, d: int = 5, classes: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, d, generator=g)
    return Dataset(x[:64], y[:64], x[64:], y[64:], name="blobs", num_classes=classes,
                   input_shape=(d,))


def _sgd(lr: float = 0.1):
    return lambda model, loss_fn: build_optimizer("sgd", model, loss_fn, {"lr": lr})


def test_exponential_schedule_matches_martens_formula():
    sched = exponential_batch_schedule(60000, 1000, 500)
    b = 499 / math.log2(60)
    assert sched(1) == 1000
    assert sched(200) == int(2 ** (199 / b) * 1000)
    assert sched(500) == 60000 and sched(900) == 60000
    assert all(sched(k) <= sched(k + 1) for k in range(1, 600))
    assert exponential_batch_schedule(100, 200, 10)(1) == 100
    with pytest.raises(ValueError, match="positive"):
        exponential_batch_schedule(0, 1, 1)


def test_train_trace_and_summary():
    data = _blobs()
    res = train(_sgd(0.2), lambda: nn.Linear(5, 3), data, loss_fn=nn.CrossEntropyLoss(),
                iterations=12, batch_size=16, eval_every=5, seed=3)
    assert [r["iteration"] for r in res.trace] == [0, 5, 10, 12]
    assert res.trace[0]["time_s"] == 0.0
    assert all(a["time_s"] <= b["time_s"] for a, b in zip(res.trace, res.trace[1:]))
    s = res.summary
    assert s["iterations"] == 12 and not s["diverged"]
    assert s["final_train_loss"] < res.trace[0]["train_loss"]
    assert s["n_steps"] == 12 and s["n_forward"] >= 12
    assert math.isnan(s["time_to_target"]) and not s["reached_target"]
    # same seed -> same numbers (time aside)
    again = train(_sgd(0.2), lambda: nn.Linear(5, 3), data, loss_fn=nn.CrossEntropyLoss(),
                  iterations=12, batch_size=16, eval_every=5, seed=3)
    assert again.summary["final_train_loss"] == s["final_train_loss"]


def test_train_epochs_target_and_schedule():
    data = _blobs()
    res = train(_sgd(0.5), lambda: nn.Linear(5, 3), data, loss_fn=nn.CrossEntropyLoss(),
                epochs=4, batch_size=32, eval_every=1, target_loss=0.6, stop_at_target=True)
    assert res.summary["reached_target"]
    assert res.summary["iterations"] == res.summary["iters_to_target"] <= 8
    sizes = []
    res = train(_sgd(), lambda: nn.Linear(5, 3), data, loss_fn=nn.CrossEntropyLoss(),
                iterations=6, batch_size=lambda k: sizes.append(k) or min(8 * k, 64),
                eval_every=1)
    assert [r["batch_size"] for r in res.trace[1:]] == [8, 16, 24, 32, 40, 48]


def test_train_detects_divergence():
    data = _blobs()
    res = train(_sgd(1e6), lambda: nn.Linear(5, 3), data, loss_fn=nn.CrossEntropyLoss(),
                iterations=50, batch_size=64, eval_every=1)
    assert res.summary["diverged"] and res.summary["iterations"] < 50


def test_train_bad_arguments():
    data = _blobs()
    kw = {"loss_fn": nn.CrossEntropyLoss()}
    with pytest.raises(ValueError, match="exactly one"):
        train(_sgd(), lambda: nn.Linear(5, 3), data, **kw)
    with pytest.raises(ValueError, match="eval_every"):
        train(_sgd(), lambda: nn.Linear(5, 3), data, iterations=1, eval_every=0, **kw)
    with pytest.raises(ValueError, match="amp"):
        train(_sgd(), lambda: nn.Linear(5, 3), data, iterations=1, amp="fp8", **kw)
    with pytest.raises(ValueError, match="batch size"):
        train(_sgd(), lambda: nn.Linear(5, 3), data, iterations=1, batch_size=1000, **kw)


def test_evaluate_reconstruction_error():
    x = torch.zeros(4, 3)
    loss, err = evaluate(nn.Identity(), nn.BCEWithLogitsLoss(), x, torch.ones(4, 3),
                         "reconstruction")
    assert err == pytest.approx(3 * 0.25)  # sigmoid(0) = 1/2 per pixel, 3 pixels
    assert loss == pytest.approx(math.log(2))


def test_first_crossing_and_select_best():
    tr = pd.DataFrame({"iteration": [0, 5, 10], "time_s": [0.0, 1.0, 2.0],
                       "train_loss": [2.0, 0.9, 0.4]})
    assert first_crossing(tr, 1.0) == 1.0
    assert first_crossing(tr, 0.5, at="iteration") == 10
    assert math.isnan(first_crossing(tr, 0.1))
    df = pd.DataFrame({"m": ["a"] * 4, "hp.lr": [0.1, 0.1, 1.0, 1.0], "seed": [0, 1, 0, 1],
                       "final_train_loss": [0.5, 0.7, 0.1, 0.2], "diverged": [0, 0, 1, 0]})
    best = select_best(df, ["m"])
    assert best["hp.lr"].tolist() == [0.1, 0.1]  # lr=1 diverged once -> +inf mean


def test_select_best_ties_go_to_the_first_listed_setting():
    df = pd.DataFrame({"m": ["a"] * 3 + ["b"] * 2, "hp.lr": [3.0, 1.0, 2.0, 1.0, 0.5],
                       "seed": 0, "final_train_loss": [0.5, 0.5, 0.7, math.inf, math.nan]})
    best = select_best(df, ["m"])
    assert best[["m", "hp.lr"]].values.tolist() == [["a", 3.0], ["b", 1.0]]
    # every run its own setting (a grid searched on one seed), keyed by the run key
    df["key"] = ["k0", "k1", "k2", "k3", "k4"]
    assert select_best(df, ["m"], hyper=["key"])["key"].tolist() == ["k0", "k3"]
    with pytest.raises(KeyError, match="no column"):
        select_best(df, ["m"], score="final_val_error")


def test_method_and_build_optimizer():
    m = Method("x", "adam", {"weight_decay": 0.0}, {"lr": [1e-3, 1e-2], "betas": [(0.9, 0.99)]})
    assert m.tuned and len(m.configs()) == 2 and m.grid_points()[0] == {
        "lr": 1e-3, "betas": (0.9, 0.99)}
    assert not Method("cb", "curveball").tuned
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Method("bad", "newton")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("newton", nn.Linear(2, 2), nn.MSELoss(), {})
    reason = unavailable_reason(Method("sgd-bad", "sgd", {"lr": -1.0}),
                                lambda: nn.Linear(2, 2), nn.MSELoss())
    assert reason is not None and reason.startswith("ValueError")
    assert unavailable_reason(Method("ok", "sgd", {"lr": 0.1}), lambda: nn.Linear(2, 2),
                              nn.MSELoss()) is None


def test_build_optimizer_covers_every_study():
    lin = nn.Linear(2, 1, dtype=torch.float64)
    loss = nn.MSELoss()
    adam = build_optimizer("adam", lin, loss, {"lr": 0.1, "beta1": 0.99, "beta2": 0.999})
    assert adam.optimizer.defaults["betas"] == (0.99, 0.999)
    with pytest.raises(ValueError, match="not both"):
        build_optimizer("adam", lin, loss, {"betas": (0.9, 0.9), "beta1": 0.5})
    names = {"ngd": {"damping": 1e-2}, "lm": {}, "bfgs": {}, "curveball": {"engine": "auto"},
             "hessian-free": {}, "kfac": {"damping": 1e-2}}
    for name, hp in names.items():
        assert build_optimizer(name, nn.Linear(2, 1, dtype=torch.float64), loss, hp) is not None
    # seed= gives the optimizer its own generator, seeded like torch.Generator().manual_seed
    kfac = build_optimizer("kfac", lin, loss, {"damping": 1e-2}, seed=7)
    assert torch.equal(kfac.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    with pytest.raises(ValueError, match="not both"):
        build_optimizer("kfac", lin, loss, {"damping": 1e-2, "generator": None}, seed=1)
    with pytest.raises(TypeError):  # torch.optim.SGD has no sampling: a loud error
        build_optimizer("sgd", lin, loss, {"lr": 0.1}, seed=1)


def test_comparison_helpers():
    table = pd.DataFrame({"problem": ["p", "p", "p", "q"],
                          "method": ["a", "b", "c", "a"],
                          "status": ["ran", "ran", "not run: x", "ran"],
                          "diverged": [False, True, False, False],
                          "final_train_error": [0.5, 0.1, math.nan, 0.25]})
    assert method_value(table, "p", "a", "final_train_error") == 0.5
    assert method_value(table, "p", "b", "final_train_error") == math.inf  # diverged
    assert method_value(table, "p", "c", "final_train_error") == math.inf  # not run
    assert method_value(pd.DataFrame(), "p", "a", "final_train_error") == math.inf
    assert best_methods(table, ["p", "q", "r"], "final_train_error") == {
        "p best": "b 0.1", "q best": "a 0.25"}
    assert best_methods(table, ["p"], "final_val_error") == {}

    def missing():
        raise FileNotFoundError("gone")

    built, skipped = build_problems([("x", missing)])
    assert built == [] and skipped == {"x": "data not available: gone"}
    res = ComparisonResult(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {("p", "c"): "x"})
    assert not_run_notes(res, skipped) == "p/c: not run: x; x: not run: data not available: gone"


def test_run_comparison_reports_unavailable_and_resumes(tmp_path):
    data = _blobs()
    problem = TrainingProblem("blobs", data, lambda: nn.Linear(5, 3), nn.CrossEntropyLoss(),
                              iterations=6, batch_size=16, batch_label=16, eval_every=3)
    methods = [Method("SGD", "sgd", {"momentum": 0.9}, {"lr": [0.01, 0.3]}, first_order=True),
               Method("Adam", "adam", {}, {"lr": [0.01]}, first_order=True),
               Method("broken", "sgd", {"lr": -1.0})]
    ctx = make_context(tmp_path, device="cpu", progress=False)
    res = run_comparison("cmp-test", [problem], methods, ctx, seeds=[0, 1])
    assert len(res.summary) == 6
    assert ("blobs", "broken") in res.not_run
    table = res.best_table()
    assert set(table["method"]) == {"SGD", "Adam", "broken"}
    assert table.loc[table["method"] == "broken", "status"].iloc[0].startswith("not run: ")
    assert table.loc[table["method"] == "SGD", "setting"].iloc[0] == "lr=0.3"
    assert set(res.best_trace()["key"]) == set(res.best["key"])
    targets = res.first_order_targets("train_loss")
    ttt = res.time_to_target(targets, "train_loss")
    assert len(ttt) == 4 and ttt["iters_to_target"].notna().any()
    again = run_comparison("cmp-test", [problem], methods, ctx, seeds=[0, 1])
    pd.testing.assert_frame_equal(again.summary, res.summary)


def test_plotting_writes_png(tmp_path):
    tr = pd.DataFrame({"iteration": [0, 1, 0, 1], "time_s": [0, 0.1, 0, 0.3],
                       "train_error": [1.0, 0.5, 1.0, 0.8], "method": ["a", "a", "b", "b"],
                       "problem": "p"})
    fig = line_panels(tr, x=["iteration", "time_s"], y="train_error", hue="method", row="problem",
                      logy=True, title="t")
    assert save(fig, tmp_path / "sub" / "a.png").stat().st_size > 1000
    grid = pd.DataFrame([[1.0, float("nan")], [3.0, 4.0]], index=pd.Index([0.1, 1.0], name="lr"),
                        columns=pd.Index([0.0, 0.9], name="momentum"))
    fig = heatmap_panels([("B=1", grid), ("B=2", grid)], title="h", cbar_label="it")
    assert save(fig, tmp_path / "h.png").stat().st_size > 1000
