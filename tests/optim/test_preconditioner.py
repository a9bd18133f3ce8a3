"""curvlab.optim.preconditioner.KFACPreconditioner: hooks in the user's loop, consistency with
curvlab.optim.KFACOptimizer, MC passes, KL clip, robustness."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _optim_helpers import flat_params
from torch import nn

from curvlab.optim.kfac import KFACOptimizer
from curvlab.optim.preconditioner import KFACPreconditioner

DT = torch.float64


def net_and_data(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
        x = torch.randn(10, 2, 6, 6, dtype=DT)
    else:
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
        x = torch.randn(10, 3, dtype=DT)
    return net.to(DT), x, torch.randint(0, 4, (10,))


def grads_of(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_empirical_grad_rewrite_matches_kfac_step(conv, inverse):
    net, x, y = net_and_data(conv=conv)
    ref = copy.deepcopy(net)
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(net, loss_fn, damping=0.05, inverse=inverse)
    loss_fn(net(x), y).backward()
    precond.step()
    opt = KFACOptimizer(ref, loss_fn, lr=1.0, momentum=0.0, damping=0.05, fisher="empirical",
               inverse=inverse)
    before = flat_params(ref)
    opt.step(x, y)
    torch.testing.assert_close(grads_of(net), before - flat_params(ref), rtol=1e-9, atol=1e-12)


def test_mc_sample_backward_matches_kfac_mc_step():
    net, x, y = net_and_data(1)
    ref = copy.deepcopy(net)
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(net, loss_fn, damping=0.05, fisher="mc", mc_samples=2,
                                 generator=torch.Generator().manual_seed(3))
    out = net(x)
    precond.sample_backward(out)  # before the user's backward: graph retained
    loss_fn(out, y).backward()
    precond.step()
    opt = KFACOptimizer(ref, loss_fn, lr=1.0, momentum=0.0, damping=0.05, fisher="mc", mc_samples=2,
               generator=torch.Generator().manual_seed(3))
    before = flat_params(ref)
    opt.step(x, y)
    torch.testing.assert_close(grads_of(net), before - flat_params(ref), rtol=1e-9, atol=1e-12)
    assert precond.counters["backward"] == 2


def test_mc_without_sample_backward_raises():
    net, x, y = net_and_data()
    precond = KFACPreconditioner(net, nn.CrossEntropyLoss(), damping=0.1, fisher="mc")
    nn.CrossEntropyLoss()(net(x), y).backward()
    with pytest.raises(RuntimeError, match="sample_backward"):
        precond.step()
    with pytest.raises(ValueError, match="loss_fn"):
        KFACPreconditioner(net, None, damping=0.1, fisher="mc")


def test_statistics_only_on_covariance_steps_and_in_training_mode():
    net, x, y = net_and_data()
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(net, loss_fn, damping=0.1, cov_interval=3, inv_interval=3)
    for _ in range(7):
        net.zero_grad()
        loss_fn(net(x), y).backward()
        precond.step()
    assert precond.counters["factor_updates"] == 3  # steps 0, 3, 6
    net.eval()
    net.zero_grad()
    loss_fn(net(x), y).backward()
    precond.step()  # step 7 is not a covariance step anyway; eval forward captures nothing
    assert all(not v for v in precond.capture.inputs.values())
    net.train()
    with torch.no_grad():
        net(x)
    assert all(not v for v in precond.capture.inputs.values())


def test_kl_clip_scales_preconditioned_layers():
    net, x, y = net_and_data(2)
    ref = copy.deepcopy(net)
    loss_fn = nn.CrossEntropyLoss()
    p0 = KFACPreconditioner(ref, loss_fn, damping=0.1)
    loss_fn(ref(x), y).backward()
    g = grads_of(ref).clone()
    p0.step()
    p = grads_of(ref)
    lr, clip = 0.5, 1e-5
    precond = KFACPreconditioner(net, loss_fn, damping=0.1, kl_clip=clip, lr=lambda: lr)
    loss_fn(net(x), y).backward()
    precond.step()
    nu = min(1.0, math.sqrt(clip / abs(lr**2 * float(p @ g))))
    assert nu < 1
    torch.testing.assert_close(grads_of(net), nu * p, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="lr"):
        KFACPreconditioner(net, loss_fn, damping=0.1, kl_clip=clip)


def test_unsupported_params_keep_their_gradient_and_strict_raises():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="BatchNorm1d.*plain gradient"):
        precond = KFACPreconditioner(net, nn.MSELoss(), damping=0.1, unitwise=False)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    nn.MSELoss()(net(x), y).backward()
    g_bn = net[1].weight.grad.clone()
    g_lin = net[0].weight.grad.clone()
    precond.step()
    assert torch.equal(net[1].weight.grad, g_bn)
    assert not torch.allclose(net[0].weight.grad, g_lin)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        KFACPreconditioner(net, nn.MSELoss(), damping=0.1, strict=True, unitwise=False)


def test_nonfinite_gradients_leave_grad_and_state_untouched():
    net, x, y = net_and_data()
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(net, loss_fn, damping=0.1)
    loss_fn(net(x), y).backward()
    precond.step()
    state = copy.deepcopy(precond.state_dict())
    net.zero_grad()
    loss_fn(net(x), y).backward()
    net[0].weight.grad[0, 0] = float("nan")
    g = [p.grad.clone() for p in net.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        precond.step()
    for p, q in zip(net.parameters(), g):
        assert torch.equal(p.grad, q) or (torch.isnan(p.grad) == torch.isnan(q)).all()
    new = precond.state_dict()
    assert new["steps"] == state["steps"]
    for n, b in state["engine"]["blocks"].items():
        assert torch.equal(new["engine"]["blocks"][n]["A"], b["A"])


def test_training_loop_with_torch_sgd_and_state_round_trip():
    net, x, y = net_and_data(3)
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(net, loss_fn, damping=0.1, inv_interval=2)
    sgd = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for i in range(12):
        sgd.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        precond.step()
        sgd.step()
        losses.append(loss.item())
        if i == 5:
            net2 = copy.deepcopy(net)
            sgd2 = torch.optim.SGD(net2.parameters(), lr=0.2, momentum=0.9)
            sgd2.load_state_dict(copy.deepcopy(sgd.state_dict()))
            pre2 = KFACPreconditioner(net2, loss_fn, damping=0.1, inv_interval=2)
            pre2.load_state_dict(copy.deepcopy(precond.state_dict()))
    for _ in range(6):
        sgd2.zero_grad()
        loss_fn(net2(x), y).backward()
        pre2.step()
        sgd2.step()
    assert losses[-1] < 0.5 * losses[0]
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert precond.memory_usage()["total"] > 0
