"""THOR's block-split factors: exact against the dense split Kronecker matrix (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab
from curvlab.kfac import KroneckerBlock, find_layers
from curvlab.kfac.split import SplitMatrix
from curvlab.optim import KFACOptimizer

DT = torch.float64


def _nets():
    torch.manual_seed(0)
    yield "linear", nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3)).to(DT), (12, 7)
    yield "conv", nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Flatten(),
                                nn.Linear(5 * 3 * 3, 3)).to(DT), (12, 2, 5, 5)


def _data(shape):
    torch.manual_seed(1)
    return torch.randn(*shape, dtype=DT), torch.randint(0, 3, (shape[0],))


@pytest.mark.parametrize("k", [100, 9])
def test_split_at_least_factor_size_equals_unsplit(k):
    for _, net, shape in _nets():
        x, y = _data(shape)
        a = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y), split_dim=k)
        b = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y))
        if k == 100:
            torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)
            torch.testing.assert_close(a.inverse(0.1).to_dense(), b.inverse(0.1).to_dense(),
                                       rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("inverse", ["eigen", "factored"])
@pytest.mark.parametrize("k", [2, 4])
def test_split_inverse_equals_dense_inverse_of_split_kronecker(inverse, k):
    lam = 0.05
    for _, net, shape in _nets():
        x, y = _data(shape)
        K = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y), split_dim=k)
        ref = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y))
        K.engine.refresh()
        for layer in K.layers:
            blk, full = K.engine.blocks[layer.name], ref.engine.blocks[layer.name]
            A = SplitMatrix.from_dense(full.A, k).dense() if layer.in_dim > k else full.A
            G = SplitMatrix.from_dense(full.G, k).dense() if layer.out_dim > k else full.G
            torch.testing.assert_close(blk.to_dense(power=1), torch.kron(G, A), rtol=1e-12,
                                       atol=1e-14)
            if inverse == "eigen":
                damped = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
            else:
                damped = torch.kron(*blk.factored_damped(lam))
            torch.testing.assert_close(
                blk.to_dense(power=-1, damping=lam, inverse=inverse), torch.linalg.inv(damped),
                rtol=1e-8, atol=1e-10)


def test_split_statistics_in_optimizer_equal_split_of_full():
    for _, net, shape in _nets():
        x, y = _data(shape)
        split = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, fisher="type2",
                              split_dim=3)
        full = KFACOptimizer(copy.deepcopy(net), nn.CrossEntropyLoss(), lr=0.1, damping=0.1,
                             fisher="type2")
        split.step(x, y)
        full.step(x, y)
        for name, b in split.engine.blocks.items():
            f = full.engine.blocks[name]
            for X, Y in ((b.A, f.A), (b.G, f.G)):
                want = SplitMatrix.from_dense(Y, 3).dense() if Y.shape[0] > 3 else Y
                got = X.dense() if isinstance(X, SplitMatrix) else X
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_split_reduces_memory_and_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opts = {k: KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, split_dim=k)
            for k in (None, 16)}
    for opt in opts.values():
        opt.step(x, y)
    full, split = (opts[k].memory_usage() for k in (None, 16))
    assert split["factors"] < full["factors"] / 3
    assert split["inverses"] < full["inverses"] / 3


def test_invalid_split_dim_is_named():
    layer = find_layers(nn.Sequential(nn.Linear(2, 2)))[0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="split_dim"):
            KroneckerBlock(layer, split_dim=bad)
    with pytest.raises(ValueError, match="split_dim"):
        KFACOptimizer(nn.Sequential(nn.Linear(2, 2)), nn.MSELoss(), damping=0.1,
                      structure="block-tridiagonal", split_dim=2)


@pytest.mark.parametrize("kw", [{"ekfac": True}, {"inverse": "factored"}])
def test_split_combines_with_policies_and_ekfac(kw):
    from curvlab.kfac import AdaptiveRefresh, TraceRefresh

    for policy in (AdaptiveRefresh(alpha=0.5), TraceRefresh(omega=0.05)):
        for _, net, shape in _nets():
            x, y = _data(shape)
            opt = KFACOptimizer(copy.deepcopy(net), nn.CrossEntropyLoss(), lr=0.1, damping=0.1,
                                split_dim=4, refresh=copy.deepcopy(policy), **kw)
            losses = [float(opt.step(x, y)) for _ in range(6)]
            assert losses[-1] < losses[0]
