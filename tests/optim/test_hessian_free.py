"""Hessian-free optimizer: CG on the damped GGN, LM damping, backtracking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.func import flatten
from curvlab.optim import HessianFree

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_newton_on_linear_least_squares():
    """A linear model with MSE: the GGN is the Hessian, a converged CG step is Newton's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    y = x @ torch.randn(4, 1, dtype=torch.float64) + 0.3
    opt = HessianFree(model, nn.MSELoss(), damping=1e-8, max_cg_iters=20, cg_tol=1e-12)
    opt.step(x, y)
    assert float(nn.MSELoss()(model(x), y)) < 1e-12


def test_damping_rules_and_counters():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    opt = HessianFree(model, nn.MSELoss(), damping=1.0, max_cg_iters=10)
    losses = []
    for _ in range(8):
        lam = opt.hyper("damping")
        losses.append(float(opt.step(x, y)))
        r = opt.diagnostics["ratio"]
        if r < 0.25:
            assert opt.hyper("damping") == pytest.approx(lam * 1.5)
        elif r > 0.75:
            assert opt.hyper("damping") == pytest.approx(lam * 2 / 3)
        else:
            assert opt.hyper("damping") == lam
    assert losses[-1] < losses[0]
    assert opt.counters["steps"] == 8
    assert opt.counters["ggn_products"] >= 8


def test_nan_skip_and_resume():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = HessianFree(model, nn.CrossEntropyLoss(), max_cg_iters=5)
    opt.step(x, y)
    before = copy.deepcopy(model.state_dict())
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model2 = copy.deepcopy(model)
    opt2 = HessianFree(model2, nn.CrossEntropyLoss(), max_cg_iters=5)
    opt2.load_state_dict(opt.state_dict())
    opt.step(x, y)
    opt2.step(x, y)
    assert torch.equal(flatten(model.parameters()), flatten(model2.parameters()))
