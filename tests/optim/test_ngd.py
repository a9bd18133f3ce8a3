"""curvlab.optim.NaturalGradient against a dense float64 solve; parameter cap; robustness."""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_helpers import dense_ggn, flat_grad, flat_params
from torch import nn

from curvlab.optim.ngd import NaturalGradient, dense_curvature

DT = torch.float64


def small(seed=0, bn=False):
    torch.manual_seed(seed)
    mods = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 4)]
    return nn.Sequential(*mods).to(DT)


@pytest.mark.parametrize("loss", ["ce", "mse", "custom"])
def test_ggn_matches_dense_oracle(loss):
    net = small()
    x = torch.randn(6, 3, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 4, (6,))
    elif loss == "mse":
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(6, 4, dtype=DT)
    else:
        def loss_fn(o, t):
            return ((o - t) ** 4).mean()
        y = torch.randn(6, 4, dtype=DT)
    F = dense_curvature(net, loss_fn, x, y)
    torch.testing.assert_close(F, dense_ggn(net, loss_fn, x, y), rtol=1e-8, atol=1e-12)


def test_empirical_fisher_matches_per_example_gradients():
    net = small(1)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 4, (5,))
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for n in range(5):
        rows.append(flat_grad(net, loss_fn, x[n:n + 1], y[n:n + 1]))
    G = torch.stack(rows)
    expected = G.T @ G / 5
    F = dense_curvature(net, loss_fn, x, y, fisher="empirical")
    torch.testing.assert_close(F, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("bn", [False, True])
def test_step_equals_dense_damped_solve(bn):
    net = small(2, bn=bn)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    loss_fn = nn.CrossEntropyLoss()
    lam, wd, lr = 1e-2, 1e-3, 0.7
    ref = copy.deepcopy(net)
    F = dense_ggn(ref, loss_fn, x, y)
    theta = flat_params(ref)
    g = flat_grad(ref, loss_fn, x, y) + wd * theta
    expected = lr * torch.linalg.solve(F + (lam + wd) * torch.eye(F.shape[0], dtype=DT), g)
    opt = NaturalGradient(net, loss_fn, lr=lr, damping=lam, weight_decay=wd)
    opt.step(x, y)
    torch.testing.assert_close(theta - flat_params(net), expected, rtol=1e-8, atol=1e-12)
    if bn:  # running statistics updated exactly once, like model(x)
        ref.train()
        ref(x)
        torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)


def test_refuses_models_above_the_cap():
    net = nn.Linear(100, 60)
    with pytest.raises(ValueError, match=r"6060 selected parameters.*max_params=5000"):
        NaturalGradient(net, nn.MSELoss())
    NaturalGradient(net, nn.MSELoss(), max_params=10_000)
    NaturalGradient(net, nn.MSELoss(), params=["bias"])


def test_nan_batch_skipped_and_momentum_state_round_trip():
    net = small(3)
    loss_fn = nn.CrossEntropyLoss()
    opt = NaturalGradient(net, loss_fn, lr=0.5, damping=1e-2, momentum=0.9)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    opt.step(x, y)
    before = flat_params(net)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad, y)
    assert torch.equal(before, flat_params(net)) and opt.counters["skipped_steps"] == 1
    net2 = copy.deepcopy(net)
    opt2 = NaturalGradient(net2, loss_fn, lr=0.5, damping=1e-2, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(3):
        opt.step(x, y)
        opt2.step(x, y)
    assert torch.equal(flat_params(net), flat_params(net2))


def test_float32_model_with_float64_solve_decreases_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    opt = NaturalGradient(net, nn.CrossEntropyLoss(), lr=0.5, damping=1e-2, chunk_size=7)
    losses = [opt.step(x, y).item() for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_per_example_fast_path_equals_explicit_jacobian(fisher):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2 * 3 * 3, 3)).to(DT)
    x, y = torch.randn(7, 1, 6, 6, dtype=DT), torch.randint(0, 3, (7,))
    ref = copy.deepcopy(net)
    fast = NaturalGradient(net, nn.CrossEntropyLoss(), lr=0.5, damping=1e-2,
                           fisher=fisher)
    slow = NaturalGradient(ref, nn.CrossEntropyLoss(), lr=0.5, damping=1e-2,
                           fisher=fisher, per_example=False)
    assert fast._fast_layers is not None and slow._fast_layers is None
    fast.step(x, y)
    slow.step(x, y)
    torch.testing.assert_close(flat_params(net), flat_params(ref), rtol=1e-8, atol=1e-12)
