"""MuonAdamW (torch.optim.Muon on the weight matrices, AdamW on the rest) and the factory's
translation of old keyword names (float64, tiny models)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from curvlab.experiments.harness.muon import MuonAdamW
from curvlab.experiments.harness.optimizers import build_optimizer
from curvlab.optim import TorchOptimizer

DT = torch.float64


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).to(DT)


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.randn(6, 2, 4, 4, dtype=DT, generator=g), torch.randint(0, 2, (6,), generator=g)


def _reference_step(net, mats, muon, adamw, x, y):
    """Muon on explicit 2-D copies of the weights (filters reshaped), AdamW on the rest."""
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    for p, m in mats:
        m.grad = p.grad.reshape(m.shape).clone()
    muon.step()
    adamw.step()
    with torch.no_grad():
        for p, m in mats:
            p.copy_(m.reshape(p.shape))


def test_muon_adamw_equals_torch_muon_on_reshaped_matrices_and_adamw_elsewhere():
    net, ref = _net(), _net()
    opt = MuonAdamW(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, adamw_lr=3e-3)
    params = list(ref.parameters())
    mats = [(p, p.detach().clone().reshape(p.shape[0], -1)) for p in params if p.ndim >= 2]
    muon = torch.optim.Muon([m for _, m in mats], lr=0.05, momentum=0.9, weight_decay=0.01)
    adamw = torch.optim.AdamW([p for p in params if p.ndim < 2], lr=3e-3, weight_decay=0.01)
    for k in range(4):
        x, y = _batch(k)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        _reference_step(ref, mats, muon, adamw, x, y)
    for (name, a), b in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    assert [tuple(p.shape) for p in opt.muon.param_groups[0]["params"]] == [(3, 18), (4, 12),
                                                                            (2, 4)]
    assert len(opt.adamw.param_groups[0]["params"]) == 4  # conv/linear biases, BN gamma/beta


def test_two_dimensional_weights_follow_torch_muon_exactly():
    torch.manual_seed(1)
    net = nn.Linear(5, 3, bias=False).to(DT)
    ref = copy.deepcopy(net)
    opt = MuonAdamW(net.parameters(), lr=0.1)
    muon = torch.optim.Muon(ref.parameters(), lr=0.1, weight_decay=0.0)
    assert opt.adamw is None
    for k in range(3):
        x = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(k))
        for m, o in ((net, opt), (ref, muon)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert torch.equal(net.weight, ref.weight)


def test_resume_is_bit_exact_and_schedulers_scale_both_learning_rates():
    loss = nn.CrossEntropyLoss()
    net = _net()
    opt = TorchOptimizer(net, loss, MuonAdamW, lr=0.05, adamw_lr=3e-3)
    for k in range(2):
        opt.step(*_batch(k))
    state, snap = opt.state_dict(), copy.deepcopy(net.state_dict())
    for k in range(2, 4):
        opt.step(*_batch(k))
    net2 = _net()
    net2.load_state_dict(snap)
    opt2 = TorchOptimizer(net2, loss, MuonAdamW, lr=0.05, adamw_lr=3e-3)
    opt2.load_state_dict(state)
    for k in range(2, 4):
        opt2.step(*_batch(k))
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.step(*_batch(9))
    sched.step()
    assert [g["lr"] for g in opt2.optimizer.param_groups] == [0.025, 1.5e-3]
    with pytest.raises(ValueError, match="'adamw' part does not match"):
        MuonAdamW(nn.Linear(2, 2, bias=False).parameters()).load_state_dict(
            opt.optimizer.state_dict())


def test_muon_params_choose_the_matrices_and_the_rest_goes_to_adamw():
    net = _net()
    linear = [p for p in net.parameters() if p.ndim == 2]  # the conv filter stays on AdamW
    opt = MuonAdamW(net.parameters(), lr=0.05, muon_params=linear, adamw_lr=3e-3)
    assert [tuple(p.shape) for p in opt.muon.param_groups[0]["params"]] == [(4, 12), (2, 4)]
    assert [tuple(p.shape) for p in opt.adamw.param_groups[0]["params"]] == [
        (3, 2, 3, 3), (3,), (3,), (3,), (4,)]
    assert opt._views == []


def test_bad_input():
    with pytest.raises(TypeError, match="not parameter groups"):
        MuonAdamW([{"params": list(nn.Linear(2, 2).parameters())}])
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="muon_params must have ndim >= 2"):
        MuonAdamW(net.parameters(), muon_params=[net.bias])
    with pytest.raises(ValueError, match="subset of params"):
        MuonAdamW([net.weight], muon_params=[nn.Linear(2, 2).weight])
    with pytest.raises(ValueError, match="empty parameter list"):
        MuonAdamW([])


def test_factory_builds_muon_and_translates_old_keywords_without_warnings():
    net, loss = _net(), nn.CrossEntropyLoss()
    opt = build_optimizer("muon", net, loss, {"lr": 0.02, "adamw_lr": 1e-3, "momentum": 0.9})
    assert isinstance(opt.optimizer, MuonAdamW)
    assert opt.optimizer.muon.defaults["momentum"] == 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded runs' old keys must not warn
        cb = build_optimizer("curveball", nn.Linear(2, 1, dtype=DT), nn.MSELoss(),
                             {"lr": 1.0, "lambd": 10.0})
        hf = build_optimizer("hessian-free", nn.Linear(2, 1, dtype=DT), nn.MSELoss(),
                             {"lambd": 0.5})
    assert cb.defaults["damping"] == 10.0 and hf.defaults["damping"] == 0.5
    with pytest.raises(ValueError, match="not both"):
        build_optimizer("curveball", nn.Linear(2, 1), nn.MSELoss(), {"lambd": 1.0, "damping": 1.0})
