"""curvlab.optim.KFAC against dense float64 oracles; state, robustness, smoke tests."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from _optim_helpers import (
    dense_ggn,
    flat_grad,
    flat_params,
    layer_slices,
    v_order,
)
from torch import nn

from curvlab.kfac import kfac_factors
from curvlab.optim.kfac import KFACOptimizer

DT = torch.float64


def deep_linear(seed: int = 0, dims=(3, 4, 5, 2)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
    return nn.Sequential(*layers).to(DT)


def tanh_net(seed: int = 0, dims=(3, 5, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(),
                         nn.Linear(dims[1], dims[2])).to(DT)


def one_step_delta(net, opt, x, y) -> torch.Tensor:
    before = flat_params(net)
    opt.step(x, y)
    return before - flat_params(net)


def test_type2_mse_deep_linear_equals_block_natural_gradient():
    net = deep_linear()
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    loss_fn, lam = nn.MSELoss(), 0.1
    F = dense_ggn(net, loss_fn, x, y)
    g = flat_grad(net, loss_fn, x, y)
    expected = torch.zeros_like(g)
    for s in layer_slices(net):
        n = s.stop - s.start
        expected[s] = torch.linalg.solve(F[s, s] + lam * torch.eye(n, dtype=DT), g[s])
    opt = KFACOptimizer(net, loss_fn, lr=1.0, momentum=0.0, damping=lam, fisher="type2")
    delta = one_step_delta(net, opt, x, y)
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_preconditioned_gradient_matches_dense_kronecker_inverse(inverse):
    net = tanh_net()
    x, y = torch.randn(9, 3, dtype=DT), torch.randint(0, 4, (9,))
    loss_fn, lam = nn.CrossEntropyLoss(), 0.05
    factors = kfac_factors(net, loss_fn, x, y, [l for l in _layers(net)], fisher="type2")
    g = flat_grad(net, loss_fn, x, y)
    expected = torch.zeros_like(g)
    for s, mod, name in zip(layer_slices(net), [net[0], net[2]], ["0", "2"]):
        A, G = factors[name].A, factors[name].G
        if inverse == "eigen":
            M = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
        else:
            pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            r = math.sqrt(lam)
            M = torch.kron(G + r / pi * torch.eye(G.shape[0], dtype=DT),
                           A + pi * r * torch.eye(A.shape[0], dtype=DT))
        perm = v_order(mod.out_features, mod.in_features, True)
        gv = g[s][perm]
        sol = torch.linalg.solve(M, gv)
        block = torch.empty_like(sol)
        block[perm] = sol
        expected[s] = block
    opt = KFACOptimizer(net, loss_fn, lr=1.0, momentum=0.0, damping=lam, fisher="type2",
               inverse=inverse)
    torch.testing.assert_close(one_step_delta(net, opt, x, y), expected, rtol=1e-8,
                               atol=1e-12)


def _layers(net):
    from curvlab.kfac import find_layers

    return find_layers(net).layers


def test_adaptive_alpha_mu_match_dense_quadratic_model():
    net = tanh_net(1)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 4, (10,))
    loss_fn = nn.CrossEntropyLoss()
    wd = 1e-3
    opt = KFACOptimizer(net, loss_fn, damping=0.5, fisher="type2", adaptive=True, weight_decay=wd,
               lambda_interval=100, gamma_interval=100)
    theta0 = flat_params(net)
    opt.step(x, y)
    theta1 = flat_params(net)
    delta0 = theta1 - theta0
    F = dense_ggn(net, loss_fn, x, y)
    gh = flat_grad(net, loss_fn, x, y) + wd * theta1
    lam = opt.damping
    opt.step(x, y)
    proposal = torch.cat([t.reshape(-1) for t in opt.last_proposal])
    Fd = F + (lam + wd) * torch.eye(F.shape[0], dtype=DT)
    M = torch.stack([torch.stack([proposal @ Fd @ proposal, proposal @ Fd @ delta0]),
                     torch.stack([delta0 @ Fd @ proposal, delta0 @ Fd @ delta0])])
    c = torch.stack([gh @ proposal, gh @ delta0])
    sol = -torch.linalg.solve(M, c)
    assert opt.diagnostics["alpha"] == pytest.approx(float(sol[0]), rel=1e-8)
    assert opt.diagnostics["mu"] == pytest.approx(float(sol[1]), rel=1e-8)
    assert opt.diagnostics["qmodel_change"] == pytest.approx(0.5 * float(sol @ c), rel=1e-8)
    step = flat_params(net) - theta1
    torch.testing.assert_close(step, sol[0] * proposal + sol[1] * delta0, rtol=1e-8,
                               atol=1e-12)


def test_adaptive_first_step_is_one_dimensional():
    net = tanh_net(2)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 4, (10,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(net, loss_fn, damping=1.0, fisher="type2", adaptive=True)
    F = dense_ggn(net, loss_fn, x, y)
    g = flat_grad(net, loss_fn, x, y)
    theta0 = flat_params(net)
    opt.step(x, y)
    d = torch.cat([t.reshape(-1) for t in opt.last_proposal])
    alpha = -(g @ d) / (d @ F @ d + 1.0 * (d @ d))
    assert opt.diagnostics["alpha"] == pytest.approx(float(alpha), rel=1e-8)
    assert opt.diagnostics["mu"] == 0.0
    torch.testing.assert_close(flat_params(net) - theta0, alpha * d, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("rho", "direction"), [(-1.0, 1), (0.1, 1), (float("nan"), 1),
                                                (0.5, 0), (0.9, -1)])
def test_lm_lambda_rule(rho, direction):
    new = KFACOptimizer.adjust_lambda(2.0, rho, interval=5)
    omega = (19 / 20) ** 5
    expected = {1: 2.0 / omega, 0: 2.0, -1: 2.0 * omega}[direction]
    assert new == pytest.approx(expected, rel=1e-12)


def test_lm_lambda_updated_from_rho_every_interval():
    net = tanh_net(3)
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 4, (16,))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), damping=1.0, fisher="type2", adaptive=True,
               lambda_interval=2)
    opt.step(x, y)
    assert opt.diagnostics["rho"] is None and opt.damping == 1.0
    opt.step(x, y)
    rho = opt.diagnostics["rho"]
    assert rho is not None
    assert opt.damping == pytest.approx(KFACOptimizer.adjust_lambda(1.0, rho, 2), rel=1e-12)


def test_rho_is_exact_reduction_ratio():
    net = tanh_net(4)
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 4, (16,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(net, loss_fn, damping=1.0, fisher="type2", adaptive=True, lambda_interval=1)
    with torch.no_grad():
        h0 = float(loss_fn(net(x), y))
    opt.step(x, y)
    with torch.no_grad():
        h1 = float(loss_fn(net(x), y))
    assert opt.diagnostics["rho"] == (
        pytest.approx((h1 - h0) / opt.diagnostics["qmodel_change"], rel=1e-8))


def test_gamma_search_keeps_gamma_in_bounds_and_picks_a_candidate():
    net = tanh_net(5)
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 4, (16,))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), damping=0.25, fisher="type2", adaptive=True,
               gamma_interval=2, weight_decay=1e-4)
    g0 = opt.gamma
    assert g0 == pytest.approx(math.sqrt(0.25 + 1e-4))
    opt.step(x, y)
    opt.step(x, y)
    omega2 = math.sqrt(19 / 20) ** 2
    cands = [max(omega2 * g0, 1e-2), g0, min(g0 / omega2, 1.0)]
    assert any(opt.gamma == pytest.approx(c) for c in cands)
    assert math.sqrt(1e-4) <= opt.gamma <= 1.0


def test_ema_warm_start_weights_and_values():
    net = tanh_net(6)
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, fisher="type2",
               ema_decay=0.6)
    block = opt.engine.blocks["0"]
    ws = []
    for k in range(1, 6):
        ws.append(block.ema_weight())
        block.updates = k
    assert ws == pytest.approx([0.0, 0.5, 0.6, 0.6, 0.6])
    block.updates = 0
    x1, y1 = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    x2, y2 = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    f1 = kfac_factors(net, nn.CrossEntropyLoss(), x1, y1, _layers(net), fisher="type2")
    opt.step(x1, y1)
    f2 = kfac_factors(net, nn.CrossEntropyLoss(), x2, y2, _layers(net), fisher="type2")
    opt.step(x2, y2)
    for name in ("0", "2"):
        torch.testing.assert_close(opt.engine.blocks[name].A, 0.5 * f1[name].A + 0.5 * f2[name].A)
        torch.testing.assert_close(opt.engine.blocks[name].G, 0.5 * f1[name].G + 0.5 * f2[name].G)


def _make(seed, **kw):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    kw.setdefault("damping", 0.1)
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), generator=torch.Generator().manual_seed(1),
                        **kw)
    return net, opt


@pytest.mark.parametrize("kw", [
    {"lr": 0.1, "fisher": "mc", "inv_interval": 2, "cov_interval": 2, "kl_clip": 1e-2},
    {"fisher": "mc", "adaptive": True, "lambda_interval": 2, "gamma_interval": 3},
    {"lr": 0.1, "fisher": "mc", "ekfac": True, "inv_interval": 3},
])
def test_state_dict_round_trip_bit_exact(kw):
    torch.manual_seed(0)
    data = [(torch.randn(12, 4), torch.randint(0, 3, (12,))) for _ in range(8)]
    net, opt = _make(0, **kw)
    for x, y in data[:3]:
        opt.step(x, y)
    net2, opt2 = _make(1, **kw)
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    rng = torch.get_rng_state()
    for x, y in data[3:]:
        opt.step(x, y)
    torch.set_rng_state(rng)
    for x, y in data[3:]:
        opt2.step(x, y)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["damping"] == s2["param_groups"][0]["damping"]
    c1, c2 = s1["curvlab"], s2["curvlab"]
    assert c1["gamma"] == c2["gamma"]
    assert torch.equal(c1["generator"], c2["generator"])
    for n, b in c1["engine"]["blocks"].items():
        assert torch.equal(b["A"], c2["engine"]["blocks"][n]["A"])


def _flat_state(opt):
    st = opt.state_dict()
    c = st["curvlab"]
    ts = [s["momentum_buffer"] for s in st["state"].values()] + [c["generator"].double()]
    for b in c["engine"]["blocks"].values():
        ts += [b[k] for k in ("A", "G", "F", "scalings") if b.get(k) is not None]
        eig = b["eig"]
        ts += [eig] if isinstance(eig, torch.Tensor) else list(eig or ())
    return ts, (st["param_groups"][0]["damping"], c["gamma"], c["counters"]["steps"],
                [b["updates"] for b in c["engine"]["blocks"].values()])


@pytest.mark.parametrize("where", ["input", "target"])
def test_nan_batch_is_skipped_and_leaves_everything_untouched(where):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    opt = KFACOptimizer(net, nn.MSELoss(), lr=0.1, damping=0.1)  # unit-wise BatchNorm
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt.step(x, y)
    params = [p.detach().clone() for p in net.parameters()]
    bufs = [b.clone() for b in net.buffers()]
    ts, scalars = _flat_state(opt)
    bad_x, bad_y = x.clone(), y.clone()
    (bad_x if where == "input" else bad_y)[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad_x, bad_y)
    assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 1
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    for b, c in zip(net.buffers(), bufs):
        assert torch.equal(b, c)
    ts2, scalars2 = _flat_state(opt)
    assert scalars == scalars2
    assert all(torch.equal(a, b) for a, b in zip(ts, ts2))


def test_unsupported_module_warns_and_gets_plain_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"1\.weight, 1\.bias.*plain gradient"):
        opt = KFACOptimizer(net, nn.MSELoss(), lr=1.0, momentum=0.0, damping=0.1,
                            unitwise=False)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    g = torch.autograd.grad(nn.MSELoss()(net(x), y), [net[1].weight, net[1].bias])
    w0, b0 = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    opt.step(x, y)
    torch.testing.assert_close(w0 - net[1].weight, g[0])
    torch.testing.assert_close(b0 - net[1].bias, g[1])
    with pytest.raises(ValueError, match="LayerNorm"):
        KFACOptimizer(net, nn.MSELoss(), damping=0.1, strict=True, unitwise=False)


def test_kl_clip_scales_the_step():
    net = tanh_net(7)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 4, (10,))
    ref = copy.deepcopy(net)
    lr, clip = 0.5, 1e-4
    d_ref = one_step_delta(ref, KFACOptimizer(ref, nn.CrossEntropyLoss(), lr=lr, momentum=0.0,
                                     damping=0.1, fisher="type2"), x, y)
    g = flat_grad(net, nn.CrossEntropyLoss(), x, y)
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=lr, momentum=0.0, damping=0.1,
                        fisher="type2",
               kl_clip=clip)
    d = one_step_delta(net, opt, x, y)
    p = d_ref / lr
    nu = min(1.0, math.sqrt(clip / abs(lr**2 * float(p @ g))))
    assert nu < 1.0
    torch.testing.assert_close(d, nu * d_ref, rtol=1e-10, atol=1e-14)


def test_ekfac_scalings_are_dense_block_diagonal_in_eigenbasis():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 4)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 4, (6,))
    loss_fn = nn.CrossEntropyLoss()
    F = dense_ggn(net, loss_fn, x, y)
    opt = KFACOptimizer(net, loss_fn, lr=1.0, momentum=0.0, damping=0.1, fisher="type2", ekfac=True)
    opt.step(x, y)
    _, QA, _, QG = opt.engine.blocks["0"].eig
    perm = v_order(4, 3, True)
    Fv = F[perm][:, perm]
    Q = torch.kron(QG, QA)
    expected = torch.diagonal(Q.T @ Fv @ Q).reshape(4, 4)
    torch.testing.assert_close(opt.engine.blocks["0"].scalings, expected, rtol=1e-8, atol=1e-12)


def test_momentum_is_sgd_style_on_preconditioned_direction():
    net = tanh_net(9)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 4, (10,))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.3, momentum=0.5, damping=0.1,
                        fisher="type2",
               inv_interval=1)
    d1 = one_step_delta(net, opt, x, y)
    ref = copy.deepcopy(net)
    ref_opt = KFACOptimizer(ref, nn.CrossEntropyLoss(), lr=0.3, momentum=0.0, damping=0.1,
                   fisher="type2", inv_interval=1)
    ref_opt.load_state_dict(opt.state_dict())
    ref_opt.state.clear()  # no momentum buffer
    p2 = one_step_delta(ref, ref_opt, x, y)
    d2 = one_step_delta(net, opt, x, y)
    torch.testing.assert_close(d2, 0.5 * d1 + p2, rtol=1e-9, atol=1e-12)


def test_conv_net_trains_and_reports_memory():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.3, damping=0.1, fisher="mc")
    losses = [float(opt.step(x, y)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    mem = opt.memory_usage()
    a_bytes = (10 * 10 + 4 * 4 + 145 * 145 + 3 * 3) * 4
    assert mem["factors"] == a_bytes
    assert mem["inverses"] == a_bytes + (10 + 4 + 145 + 3) * 4
    assert mem["total"] == mem["factors"] + mem["inverses"]
    assert opt.counters["forward"] == 15 and opt.counters["backward"] == 30


def test_kfac_beats_tuned_sgd_per_iteration_on_ill_conditioned_problem():
    torch.manual_seed(0)
    x = torch.randn(128, 8) * torch.logspace(-1, 1, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)
    loss_fn = nn.CrossEntropyLoss()

    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    net = fresh()
    opt = KFACOptimizer(net, loss_fn, lr=0.3, momentum=0.5, damping=0.1, fisher="mc",
                        inv_interval=5,
               generator=torch.Generator().manual_seed(0))
    for _ in range(15):
        opt.step(x, y)
    with torch.no_grad():
        kfac_loss = float(loss_fn(net(x), y))
    sgd_losses = []
    for lr in (0.03, 0.1, 0.3, 1.0, 3.0):  # SGD's learning rate tuned on a grid
        net = fresh()
        sgd = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
        for _ in range(15):
            sgd.zero_grad()
            loss_fn(net(x), y).backward()
            sgd.step()
        with torch.no_grad():
            sgd_losses.append(float(loss_fn(net(x), y)))
    assert kfac_loss < min(sgd_losses)


def test_bf16_autocast_keeps_factors_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            loss = opt.step(x, y)
    assert math.isfinite(float(loss))
    for name in ("0", "2"):
        assert opt.engine.blocks[name].A.dtype == torch.float32
        assert opt.engine.blocks[name].G.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in opt.engine.blocks[name].eig)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_invalid_arguments_are_named():
    net = tanh_net()
    with pytest.raises(ValueError, match="fisher"):
        KFACOptimizer(net, nn.MSELoss(), damping=0.1, fisher="exact")
    with pytest.raises(ValueError, match="cov_interval"):
        KFACOptimizer(net, nn.MSELoss(), damping=0.1, cov_interval=0)
    with pytest.raises(ValueError, match="inverse"):
        KFACOptimizer(net, nn.MSELoss(), damping=0.1, inverse="lu")
    with pytest.raises(ValueError, match="load_state_dict"):
        KFACOptimizer(deep_linear(), nn.MSELoss(), damping=0.1).load_state_dict(
            KFACOptimizer(net, nn.MSELoss(), damping=0.1).state_dict())


def test_intervals_and_counters():
    net = tanh_net()
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, cov_interval=2,
                   inv_interval=4)
        for _ in range(9):
            opt.step(x, y)
    assert opt.counters["factor_updates"] == 5  # steps 1, 3, 5, 7, 9
    assert opt.counters["inverse_updates"] == 4  # steps 1, 3 (forced), 5, 9
    assert opt.counters["backward"] == 9 + 5


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_block_tridiagonal_step_matches_tridiagonal_inverse(fisher):
    from curvlab.kfac.tridiagonal import TridiagonalInverse, tridiagonal_factors

    net = deep_linear(3, dims=(3, 4, 5, 2))
    net = nn.Sequential(net[0], nn.Tanh(), net[1], nn.Tanh(), net[2])
    x, y = torch.randn(9, 3, dtype=DT), torch.randn(9, 2, dtype=DT)
    loss_fn, lam = nn.MSELoss(), 0.1
    layers = _layers(net)
    tri = TridiagonalInverse(tridiagonal_factors(net, loss_fn, x, y, layers, fisher=fisher), lam)
    g = torch.autograd.grad(loss_fn(net(x), y), list(net.parameters()))
    vs = [layer.to_matrix(g[2 * i], g[2 * i + 1]) for i, layer in enumerate(layers)]
    us = tri.apply(vs)
    expected = torch.cat([t.reshape(-1) for u, layer in zip(us, layers)
                          for t in layer.from_matrix(u)])
    opt = KFACOptimizer(net, loss_fn, lr=1.0, momentum=0.0, damping=lam, fisher=fisher,
               structure="block-tridiagonal")
    torch.testing.assert_close(one_step_delta(net, opt, x, y), expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="block-tridiagonal"):
        KFACOptimizer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1)), loss_fn,
             damping=0.1, structure="block-tridiagonal")


def test_block_tridiagonal_adaptive_and_state_round_trip():
    torch.manual_seed(0)
    data = [(torch.randn(12, 4), torch.randint(0, 3, (12,))) for _ in range(6)]

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        return net, KFACOptimizer(net, nn.CrossEntropyLoss(), damping=0.5, adaptive=True,
                         structure="block-tridiagonal", inv_interval=2, gamma_interval=3,
                         generator=torch.Generator().manual_seed(0))

    net, opt = make()
    for x, y in data[:3]:
        opt.step(x, y)
    net2, opt2 = make()
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in data[3:]:
        opt.step(x, y)
        opt2.step(x, y)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert math.isfinite(opt.diagnostics["alpha"])


def test_adaptive_rho_evaluation_leaves_batchnorm_stats_and_dropout_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
                        nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.warns(UserWarning, match="plain gradient"):
        opt = KFACOptimizer(net, nn.CrossEntropyLoss(), damping=1.0, adaptive=True,
                            unitwise=False,
                            lambda_interval=1)
    torch.manual_seed(5)
    loss = opt.step(x, y)
    torch.manual_seed(5)
    with torch.no_grad():
        ref_loss = nn.CrossEntropyLoss()(ref(x), y)  # same dropout mask, one BN update
    assert torch.equal(loss, ref_loss)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    assert int(net[1].num_batches_tracked) == 1
    rho = opt.diagnostics["rho"]
    assert rho is not None and math.isfinite(rho)
    # rho used the replayed dropout mask: recompute h(θ+δ) with the same mask
    torch.manual_seed(5)
    ref2 = copy.deepcopy(net)
    from curvlab.func.params import cloned_buffers

    with torch.no_grad():
        out = torch.func.functional_call(ref2, (dict(ref2.named_parameters()),
                                                cloned_buffers(ref2)), (x,))
    h1 = float(nn.CrossEntropyLoss()(out, y))
    assert rho == pytest.approx((h1 - float(loss)) / opt.diagnostics["qmodel_change"], rel=1e-6)
