"""SP-NGD's unit-wise blocks for normalization layers: exact 2x2 Fisher blocks (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab
from curvlab.kfac import find_layers
from curvlab.kfac.unitwise import NormLayer, UnitWiseBlock
from curvlab.optim import KFACOptimizer

DT = torch.float64


def _nets():
    torch.manual_seed(0)
    yield "layernorm", nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(),
                                     nn.Linear(4, 3)).to(DT), (3,)
    yield "groupnorm", nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(DT), (2, 5, 5)
    bn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                       nn.Linear(4 * 3 * 3, 3)).to(DT)
    bn.eval()
    yield "batchnorm-eval", bn, (2, 5, 5)


def _unit_indices(K, layer):
    names = K.param_names
    offs = torch.tensor([0, *[p.numel() for p in dict(K.model.named_parameters()).values()
                              if True]]).cumsum(0)
    sel = dict(zip(names, range(len(names)), strict=True))
    w0, b0 = int(offs[sel[layer.weight]]), int(offs[sel[layer.bias]])
    return [(w0 + c, b0 + c) for c in range(layer.units)]


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_unit_blocks_equal_dense_fisher_entries(fisher):
    for _, net, shape in _nets():
        torch.manual_seed(1)
        n = 1 if fisher == "type2" else 5
        x, y = torch.randn(n, *shape, dtype=DT), torch.randint(0, 3, (n,))
        loss_fn = nn.CrossEntropyLoss()
        K = curvlab.KFAC(net, loss_fn, (x, y), fisher=fisher, strict=True)
        ref = (curvlab.GGN if fisher == "type2" else curvlab.EmpiricalFisher)(
            net, loss_fn, (x, y)).to_dense()
        dense = K.to_dense()
        (layer,) = K.layers.norm
        for i, j in _unit_indices(K, layer):
            idx = torch.tensor([i, j])
            torch.testing.assert_close(dense[idx[:, None], idx[None, :]],
                                       ref[idx[:, None], idx[None, :]], rtol=1e-8, atol=1e-12)


def test_unit_inverse_is_per_unit_damped_solve():
    net = next(_nets())[1]
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    K = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y))
    lam = 0.1
    inv = K.inverse(lam)
    v = torch.randn(K.shape[0], dtype=DT)
    torch.testing.assert_close(K @ (inv @ v) + lam * (inv @ v), v, rtol=1e-8, atol=1e-10)


def test_optimizer_and_preconditioner_precondition_norm_parameters():
    for _, net, shape in _nets():
        net = copy.deepcopy(net).train()
        x, y = torch.randn(8, *shape, dtype=DT), torch.randint(0, 3, (8,))
        K = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y), fisher="empirical")
        g = torch.autograd.grad(nn.CrossEntropyLoss()(net(x), y), list(net.parameters()))
        want = K.unflatten(K.inverse(0.1) @ K.flatten(list(g)))
        pre = curvlab.KFACPreconditioner(net, nn.CrossEntropyLoss(), damping=0.1)
        net.zero_grad()
        nn.CrossEntropyLoss()(net(x), y).backward()
        pre.step()
        for p, w in zip(net.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=1e-8, atol=1e-10)
        opt = KFACOptimizer(copy.deepcopy(net), nn.CrossEntropyLoss(), lr=0.1, damping=0.1)
        assert any(b.name == "1" for b in opt.engine.blocks.values())
        assert float(opt.step(x, y)) > 0


def test_unit_block_shapes_and_errors():
    layer = NormLayer("0", nn.LayerNorm(3, bias=False), "0.weight", None)
    block = UnitWiseBlock(layer)
    block.set_factors(torch.ones(3, 1, 1))
    block.refresh()
    torch.testing.assert_close(block.multiply(torch.ones(3, 1), damping=1.0),
                               torch.full((3, 1), 0.5))
    with pytest.raises(ValueError, match="shape"):
        block.multiply(torch.ones(2, 1))
    with pytest.raises(TypeError, match="BatchNorm, LayerNorm or GroupNorm"):
        NormLayer("0", nn.Linear(2, 2), "0.weight", "0.bias")
    assert find_layers(nn.Sequential(nn.Linear(2, 2))).norm == []
