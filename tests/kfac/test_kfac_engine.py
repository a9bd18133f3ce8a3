"""One Kronecker engine behind the three K-FAC entry points: every option means the same.

The operator (`curvlab.KFAC`), the optimizer (`curvlab.optim.KFACOptimizer`) and the
preconditioner (`curvlab.KFACPreconditioner`) are run on the same batch; after one step the
optimizer's and the preconditioner's factors equal the operator's (the EMA warm start takes the
first statistics as they are), and their preconditioned gradient equals the operator's damped
inverse applied to the gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab
from curvlab.kfac import KroneckerEngine, find_layers
from curvlab.optim import KFACOptimizer

DT = torch.float64


class _Shared(nn.Module):
    """One Linear called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(torch.tanh(self.inp(x)))))))


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _grouped():
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3))


MODELS = {"mlp": (_mlp, (8, 4)), "shared": (_Shared, (8, 4)), "grouped": (_grouped, (8, 2, 5, 5))}


def _setup(kind):
    torch.manual_seed(0)
    build, shape = MODELS[kind]
    net = build().to(DT)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randint(0, 3, (shape[0],))
    return net, x, y


def _grad(net, loss_fn, x, y):
    loss = loss_fn(net(x), y)
    return torch.autograd.grad(loss, list(net.parameters()))


CASES = [
    (kind, inverse, ekfac)
    for kind in MODELS
    for inverse, ekfac in (("eigen", False), ("factored", False), ("cholesky", False),
                           ("eigen", True))
]


@pytest.mark.parametrize(("kind", "inverse", "ekfac"), CASES)
def test_preconditioner_equals_operator_inverse(kind, inverse, ekfac):
    net, x, y = _setup(kind)
    loss_fn = nn.CrossEntropyLoss()
    lam = 0.1
    K = curvlab.KFAC(net, loss_fn, (x, y), fisher="empirical", ekfac=ekfac, strict=True)
    g = _grad(net, loss_fn, x, y)
    want = K.inverse(lam, method=inverse).unflatten(
        K.inverse(lam, method=inverse) @ K.flatten(list(g)))
    precond = curvlab.KFACPreconditioner(net, loss_fn, damping=lam, inverse=inverse, ekfac=ekfac,
                                         strict=True)
    net.zero_grad()
    loss_fn(net(x), y).backward()
    precond.step()
    for name, p in net.named_parameters():
        blk = precond.engine.blocks
        for layer in precond.layers:
            if layer.weight == name:
                torch.testing.assert_close(blk[layer.name].A, K.engine.blocks[layer.name].A)
        torch.testing.assert_close(p.grad, want[list(K.param_names).index(name)], rtol=1e-8,
                                   atol=1e-10)


@pytest.mark.parametrize(("kind", "inverse", "ekfac"), CASES)
def test_optimizer_step_equals_operator_inverse(kind, inverse, ekfac):
    net, x, y = _setup(kind)
    loss_fn = nn.CrossEntropyLoss()
    lam, lr = 0.1, 0.5
    K = curvlab.KFAC(net, loss_fn, (x, y), fisher="empirical", ekfac=ekfac, strict=True)
    inv = K.inverse(lam, method=inverse)
    g = K.flatten(list(_grad(net, loss_fn, x, y)))
    w0 = K.flatten([p.detach().clone() for p in net.parameters()])
    opt = KFACOptimizer(net, loss_fn, lr=lr, momentum=0.0, damping=lam, fisher="empirical",
                        inverse=inverse, ekfac=ekfac, strict=True)
    opt.step(x, y)
    for name, blk in opt.engine.blocks.items():
        torch.testing.assert_close(blk.A, K.engine.blocks[name].A)
        torch.testing.assert_close(blk.G, K.engine.blocks[name].G)
    w1 = K.flatten([p.detach() for p in net.parameters()])
    torch.testing.assert_close(w1, w0 - lr * (inv @ g), rtol=1e-8, atol=1e-10)


def test_ekfac_preconditioner_changes_the_gradient():
    """Regression: ekfac=True used to write gradients bit-identical to ekfac=False."""
    outs = []
    for ekfac in (False, True):
        net, x, y = _setup("mlp")
        precond = curvlab.KFACPreconditioner(net, nn.CrossEntropyLoss(), damping=0.1,
                                             ekfac=ekfac)
        nn.CrossEntropyLoss()(net(x), y).backward()
        precond.step()
        outs.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert not torch.allclose(outs[0], outs[1])


def test_grouped_conv_gets_blocks_everywhere():
    net, x, y = _setup("grouped")
    loss_fn = nn.CrossEntropyLoss()
    names = {"0[0]", "0[1]", "3"}
    assert set(curvlab.KFAC(net, loss_fn, (x, y), strict=True).engine.blocks) == names
    assert set(KFACOptimizer(net, loss_fn, damping=0.1, strict=True).engine.blocks) == names
    assert set(curvlab.KFACPreconditioner(net, loss_fn, damping=0.1,
                                          strict=True).engine.blocks) == names


def test_unsupported_policy_is_the_same_everywhere():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    data = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    loss_fn = nn.CrossEntropyLoss()
    kw = {"unitwise": False}
    makers = [lambda s: curvlab.KFAC(net, loss_fn, data, strict=s, **kw),
              lambda s: KFACOptimizer(net, loss_fn, damping=0.1, strict=s, **kw),
              lambda s: curvlab.KFACPreconditioner(net, loss_fn, damping=0.1, strict=s, **kw)]
    for make in makers:
        with pytest.raises(ValueError, match=r"LayerNorm.*1\.weight, 1\.bias"):
            make(True)
        with pytest.warns(UserWarning, match="1.weight"):
            make(False)
    # by default the LayerNorm gets unit-wise blocks at every entry point
    for make in (lambda: curvlab.KFAC(net, loss_fn, data, strict=True),
                 lambda: KFACOptimizer(net, loss_fn, damping=0.1, strict=True),
                 lambda: curvlab.KFACPreconditioner(net, loss_fn, damping=0.1, strict=True)):
        assert "1" in make().engine.blocks


def test_engine_state_dict_round_trip_and_layer_check():
    net, x, y = _setup("mlp")
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), damping=0.1, ekfac=True)
    for _ in range(3):
        opt.step(x, y)
    state = opt.engine.state_dict()
    other = KroneckerEngine(find_layers(net), ekfac=True)
    other.load_state_dict(state)
    for name, blk in opt.engine.blocks.items():
        torch.testing.assert_close(other.blocks[name].scalings, blk.scalings, rtol=0, atol=0)
    small = KroneckerEngine(find_layers(nn.Sequential(nn.Linear(4, 5))))
    with pytest.raises(ValueError, match=r"missing: \[\]"):
        small.load_state_dict(state)


def test_eigen_damping_change_needs_no_new_eigh(monkeypatch):
    net, x, y = _setup("mlp")
    K = curvlab.KFAC(net, nn.CrossEntropyLoss(), (x, y))
    K.inverse(0.1)
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or real(m))
    K.inverse(0.5)
    assert not calls


def test_old_optimizer_name_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert curvlab.optim.KFACOptimizer is KFACOptimizer
    with pytest.warns(DeprecationWarning, match="KFACOptimizer"):
        assert curvlab.optim.KFAC is KFACOptimizer


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_stats_fraction_equals_the_factors_of_the_subset(fisher):
    net, x, y = _setup("mlp")
    loss_fn = nn.CrossEntropyLoss()
    K = curvlab.KFAC(net, loss_fn, (x[:3], y[:3]), fisher=fisher)
    opt = KFACOptimizer(net, loss_fn, lr=0.1, damping=0.1, fisher=fisher, stats_fraction=0.3)
    opt.step(x, y)  # N = 8: ceil(0.3 * 8) = 3 examples
    for name, blk in opt.engine.blocks.items():
        torch.testing.assert_close(blk.A, K.engine.blocks[name].A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(blk.G, K.engine.blocks[name].G, rtol=1e-10, atol=1e-12)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="stats_fraction"):
            KFACOptimizer(net, loss_fn, damping=0.1, stats_fraction=bad)


# ---- batched eigendecompositions over same-size factors ----------------------------------------
def test_safe_eigh_many_equals_one_by_one_and_falls_back_per_matrix():
    from curvlab.kfac.inverse import EighError, safe_eigh, safe_eigh_many

    g = torch.Generator().manual_seed(0)
    mats = [(lambda x: x @ x.T)(torch.randn(6, 9, generator=g, dtype=torch.float64))
            for _ in range(3)] + [torch.eye(4, dtype=torch.float64)]
    for m, (d, u) in zip(mats, safe_eigh_many(mats, list("abcd")), strict=True):
        d1, u1 = safe_eigh(m)
        assert torch.equal(d, d1) and torch.equal(u, u1)
        assert u.stride() == u1.stride() and u.untyped_storage().size() == u1.untyped_storage(
        ).size()  # own storage, not a view of the stack
    bad = [mats[0], torch.full((6, 6), float("nan"), dtype=torch.float64), mats[1]]
    out = safe_eigh_many(bad, ["ok0", "A of 'fc'", "ok1"])
    assert isinstance(out[1], EighError) and "A of 'fc'" in str(out[1])
    assert torch.equal(out[0][0], safe_eigh(mats[0])[0])  # the others still decomposed
    with pytest.raises(ValueError, match="2 matrices but 1 names"):
        safe_eigh_many(mats[:2], ["a"])


def _random_factors(eng, seed=0):
    g = torch.Generator().manual_seed(seed)
    for la in eng.layers:
        a, b = (torch.randn(n, 2 * n, generator=g) for n in (la.in_dim, la.out_dim))
        eng.blocks[la.name].set_factors(a @ a.T, b @ b.T)


def test_refresh_batches_same_size_factors_in_one_eigh_and_matches_per_block(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
    eng = KroneckerEngine(find_layers(net), fisher="empirical")
    _random_factors(eng)
    calls = []
    real = torch.linalg.eigh

    def counting(m, *a, **k):
        calls.append(tuple(m.shape))
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    assert eng.refresh() == 3
    # A: three 8x8 (weights + bias column); G: two 7x7 and one 3x3 -> three calls, not six
    assert sorted(calls) == [(2, 7, 7), (3, 3), (3, 8, 8)]
    monkeypatch.setattr(torch.linalg, "eigh", real)
    for name, block in eng.blocks.items():
        (a, _), (g_, _) = block.eigh_inputs()
        from curvlab.kfac.inverse import safe_eigh

        assert torch.equal(block.eig.eigenvectors_A, safe_eigh(a)[1]), name
        assert torch.equal(block.eig.eigenvalues_G, safe_eigh(g_)[0]), name


def test_refresh_with_one_nonfinite_factor_keeps_that_blocks_inverse_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
    eng = KroneckerEngine(find_layers(net), fisher="empirical")
    _random_factors(eng)
    assert eng.refresh() == 2
    kept = eng.blocks["0"].eig
    for block in eng.blocks.values():  # new statistics averaged in (set_factors would reset)
        block.update(2 * block.A, 3 * block.G)
    eng.blocks["0"].A[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="A of '0' has non-finite entries"):
        assert eng.refresh() == 1
    assert eng.blocks["0"].eig is kept


def test_safe_eigh_float64_retry_can_be_turned_off(monkeypatch):
    from curvlab.kfac.inverse import EighError, safe_eigh

    real = torch.linalg.eigh

    def fails_in_float32(m, *a, **k):
        if m.dtype == torch.float32:
            raise RuntimeError("no convergence")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    d, _ = safe_eigh(2 * torch.eye(3))  # retried in float64, returned in float32
    assert d.dtype == torch.float32 and torch.equal(d, torch.full((3,), 2.0))
    with pytest.raises(EighError, match="A: eigh failed in float32: no convergence"):
        safe_eigh(torch.eye(3), name="A", retry_float64=False)
