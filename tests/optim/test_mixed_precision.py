"""bf16 autocast works for every optimizer, and never trains on stale low-precision weights.

Autocast caches the casts of leaf parameters for the life of the autocast context; every
curvlab optimizer updates parameters in place inside ``step()``, so each forward must see the
current values. Here all steps run inside ONE autocast context (the harshest case) and must
follow the float32 trajectory closely.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.optim import CurveBall, HessianFree, KFACOptimizer, NaturalGradient, TorchOptimizer

FACTORIES = {
    "sgd": lambda m, f: TorchOptimizer(m, f, torch.optim.SGD, lr=0.5),
    "lbfgs": lambda m, f: TorchOptimizer(m, f, torch.optim.LBFGS, lr=0.1, max_iter=3),
    "curveball": lambda m, f: CurveBall(m, f),
    "hessian-free": lambda m, f: HessianFree(m, f, max_cg_iters=5),
    "kfac": lambda m, f: KFACOptimizer(m, f, lr=0.1, damping=1e-2),
    "kfac-adaptive": lambda m, f: KFACOptimizer(m, f, damping=1.0, adaptive=True),
    "ngd": lambda m, f: NaturalGradient(m, f, lr=0.2, damping=1.0),
}


def _trajectory(name: str, amp: bool) -> list[float]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = FACTORIES[name](model, nn.CrossEntropyLoss())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        losses = [float(opt.step(x, y)) for _ in range(6)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return losses


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bf16_autocast_follows_float32_trajectory(name):
    full = _trajectory(name, amp=False)
    mixed = _trajectory(name, amp=True)
    assert full[-1] < full[0], f"{name} did not decrease the loss in float32: {full}"
    assert mixed[-1] < mixed[0] - 1e-3, f"{name} under bf16 autocast is stuck: {mixed}"
    for a, b in zip(full, mixed, strict=True):
        assert abs(a - b) < 0.05 * max(abs(a), 1e-3), (name, full, mixed)
