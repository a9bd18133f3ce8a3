"""TorchOptimizer wrapper and the dense LM / BFGS baselines."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.optim import DenseBFGS, DenseLevenbergMarquardt, TorchOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})],
)
def test_matches_plain_torch_loop(cls, kwargs):
    model = _net()
    ref = copy.deepcopy(model)
    opt = TorchOptimizer(model, nn.MSELoss(), cls, **kwargs)
    ref_opt = cls(ref.parameters(), **kwargs)
    torch.manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3), torch.randn(8, 2)
        loss = opt.step(x, y)
        ref_opt.zero_grad()
        ref_loss = nn.MSELoss()(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        assert torch.equal(loss, ref_loss.detach())
    for p, q in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    assert opt.counters["steps"] == 4 and opt.counters["forward"] == 4


def test_lbfgs_closure_and_counters():
    model = _net()
    opt = TorchOptimizer(model, nn.MSELoss(), torch.optim.LBFGS, lr=1.0, max_iter=5)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    first = opt.step(x, y)
    second = opt.step(x, y)
    assert second < first
    assert opt.counters["forward"] > 2 and opt.counters["steps"] == 2


def test_nan_skips_and_resume():
    model = _net()
    opt = TorchOptimizer(model, nn.MSELoss(), torch.optim.Adam, lr=1e-2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt.step(x, y)
    before = copy.deepcopy(model.state_dict())
    state = opt.state_dict()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.counters["skipped_steps"] == 1
    # resume
    opt.load_state_dict(state)
    a = copy.deepcopy(model)
    opt_a = TorchOptimizer(a, nn.MSELoss(), torch.optim.Adam, lr=1e-2)
    opt_a.load_state_dict(state)
    opt.step(x, y)
    opt_a.step(x, y)
    for p, q in zip(model.parameters(), a.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_optimizer_class():
    with pytest.raises(TypeError, match="optimizer_cls"):
        TorchOptimizer(nn.Linear(2, 2), nn.MSELoss(), object)


def _rosen():
    from curvlab.problems.rosenbrock import StochasticRosenbrock

    prob = StochasticRosenbrock(None, x0_noise=0.0)
    return prob, prob.make_model(), prob.draw_batch(None)


@pytest.mark.parametrize("cls", [DenseLevenbergMarquardt, DenseBFGS])
def test_dense_solvers_solve_rosenbrock(cls):
    prob, model, batch = _rosen()
    opt = cls(model, prob.loss_fn)
    for _ in range(100):
        if float(opt.step(*batch)) < 1e-4:
            break
    assert float(prob.loss_fn(model(batch[0]), batch[1]).detach()) < 1e-4
    torch.testing.assert_close(
        model.theta.detach(), torch.ones(2, dtype=torch.float64), atol=1e-2, rtol=0
    )


def test_dense_lm_step_is_damped_gauss_newton():
    prob, model, batch = _rosen()
    theta = model.theta.detach().clone()
    opt = DenseLevenbergMarquardt(model, prob.loss_fn, damping=1e-3)
    opt.step(*batch)
    r = prob.residuals(theta)
    J = torch.func.jacrev(prob.residuals)(theta)
    G, g = 2 * J.T @ J, 2 * J.T @ r
    p = torch.linalg.solve(G + 1e-3 * torch.eye(2, dtype=torch.float64), -g)
    if prob.loss(theta + p) < prob.loss(theta):
        torch.testing.assert_close(model.theta.detach(), theta + p, rtol=1e-10, atol=1e-12)


def test_dense_refuses_big_models():
    with pytest.raises(ValueError, match="max_params"):
        DenseBFGS(nn.Linear(100, 100), nn.MSELoss())
