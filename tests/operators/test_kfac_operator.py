"""curvlab.KFAC operator, EKFAC and block-tridiagonal K-FAC against dense float64 oracles."""

from __future__ import annotations

import itertools

import pytest
import torch
from _kfac_helpers import block, dense_empirical_fisher, dense_ggn, layer_index
from torch import nn

from curvlab.kfac import (
    EKFACFactors,
    TridiagonalFactors,
    TridiagonalInverse,
    ekfac_factors,
    find_layers,
    kfac_factors,
    tridiagonal_factors,
)
from curvlab.operators import GGN, EmpiricalFisher
from curvlab.operators.kfac import KFAC

DT = torch.float64


def _close(a, b, rtol=1e-8, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _deep_linear(sizes=(4, 3, 5, 2), bias=True):
    torch.manual_seed(0)
    mods = [nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes)]
    return nn.Sequential(*mods).to(DT)


def _batches(n_batches=2, n=5, d_in=4, d_out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g,
                                                                        dtype=DT))
            for _ in range(n_batches)]


def _block_diagonal_part(mat, net, layers):
    out = torch.zeros_like(mat)
    for layer in layers:
        idx = layer_index(net, layer)
        out[idx[:, None], idx[None, :]] = mat[idx[:, None], idx[None, :]]
    return out


# ------------------------------------------------------------------ operator vs GGN


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_operator_deep_linear_equals_block_diagonal_of_curvlab_ggn(reduction):
    net = _deep_linear()
    data = _batches()
    loss = nn.MSELoss(reduction=reduction)
    K = KFAC(net, loss, data)
    ggn = GGN(net, loss, data).to_dense()
    dense = K.to_dense()
    _close(dense, _block_diagonal_part(ggn, net, K.layers))
    assert K.param_names == GGN(net, loss, data).param_names


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")])
def test_operator_single_example_ce_equals_ggn_blocks(loss):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = (torch.randn(1, 3, dtype=DT), torch.tensor([1]))
    K = KFAC(net, loss, data)
    ggn = GGN(net, loss, data).to_dense()
    _close(K.to_dense(), _block_diagonal_part(ggn, net, K.layers))


def test_operator_empirical_single_example_equals_empirical_fisher_blocks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = (torch.randn(1, 3, dtype=DT), torch.tensor([2]))
    K = KFAC(net, nn.CrossEntropyLoss(), data, fisher="empirical")
    ef = EmpiricalFisher(net, nn.CrossEntropyLoss(), data).to_dense()
    _close(ef, dense_empirical_fisher(net, nn.CrossEntropyLoss(), *data))
    _close(K.to_dense(), _block_diagonal_part(ef, net, K.layers))


def test_operator_mc_converges_to_type2():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = (torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,)))
    exact = KFAC(net, nn.CrossEntropyLoss(), data).to_dense()
    mc = KFAC(net, nn.CrossEntropyLoss(), data, fisher="mc", mc_samples=3000,
              generator=0).to_dense()
    assert (mc - exact).norm() / exact.norm() < 0.05
    again = KFAC(net, nn.CrossEntropyLoss(), data, fisher="mc", mc_samples=3000,
                 generator=0).to_dense()
    assert torch.equal(mc, again)  # seeded


def test_operator_params_subset_and_no_bias():
    net = _deep_linear(bias=False)
    data = _batches(1)
    params = ["0.weight", "2.weight"]
    K = KFAC(net, nn.MSELoss(), data, params=params)
    ggn = GGN(net, nn.MSELoss(), data, params=params).to_dense()
    _close(K.to_dense(), torch.block_diag(ggn[:12, :12], ggn[12:, 12:]))


# ------------------------------------------------------------------ inverses


def test_eigen_inverse_operator_is_exact_damped_inverse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(12, 3)).to(DT)
    data = (torch.randn(4, 2, 3, 3, dtype=DT), torch.randint(0, 3, (4,)))
    K = KFAC(net, nn.CrossEntropyLoss(), data)
    lam = 1e-2
    inv = K.inverse(lam)
    v = torch.randn(K.shape[0], 3, dtype=DT)
    _close(K @ (inv @ v) + lam * (inv @ v), v, rtol=1e-8, atol=1e-9)


def test_factored_inverse_operator_matches_damped_kronecker():
    net = _deep_linear()
    data = _batches(1)
    K = KFAC(net, nn.MSELoss(), data)
    lam = 0.05
    inv = K.inverse(lam, method="factored")
    damped = torch.zeros(K.shape, dtype=DT)
    for layer in K.layers:
        idx = layer_index(net, layer)
        damped[idx[:, None], idx[None, :]] = torch.kron(
            *inv.blocks[layer.name].factored_damped(lam))
    v = torch.randn(K.shape[0], dtype=DT)
    _close(damped @ (inv @ v), v, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(inv @ v, K.inverse(lam) @ v)


def test_unsupported_batchnorm_zero_block_and_plain_damped_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    data = (torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d"):
        K = KFAC(net, nn.MSELoss(), data, unitwise=False)
    assert K.unsupported == {"1": ["1.weight", "1.bias"]}
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    dense = K.to_dense()
    bn = slice(16, 24)  # 0.weight(12) 0.bias(4) | 1.weight(4) 1.bias(4) | ...
    assert K.param_names[2:4] == ["1.weight", "1.bias"]
    assert torch.count_nonzero(dense[bn]) == 0 and torch.count_nonzero(dense[:, bn]) == 0
    v = torch.randn(K.shape[0], dtype=DT)
    out = K.inverse(0.1) @ v
    _close(out[bn], v[bn] / 0.1)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        KFAC(net, nn.MSELoss(), data, strict=True, unitwise=False)


def test_bad_arguments():
    net = _deep_linear()
    data = _batches(1)
    with pytest.raises(ValueError, match="fisher must be"):
        KFAC(net, nn.MSELoss(), data, fisher="exact")
    with pytest.raises(ValueError, match="structure must be"):
        KFAC(net, nn.MSELoss(), data, structure="full")
    with pytest.raises(ValueError, match="ekfac=True needs structure"):
        KFAC(net, nn.MSELoss(), data, structure="block-tridiagonal", ekfac=True)
    K = KFAC(net, nn.MSELoss(), data, structure="block-tridiagonal")
    with pytest.raises(ValueError, match="only method='factored'"):
        K.inverse(0.1)
    with pytest.raises(ValueError, match="data is empty"):
        KFAC(net, nn.MSELoss(), [])


# ------------------------------------------------------------------ EKFAC


def _kfe_diag(ggn_block, f: EKFACFactors):
    u = torch.kron(f.U_G, f.U_A)
    return torch.diagonal(u.T @ ggn_block @ u).reshape(f.scalings.shape)


def test_ekfac_scalings_are_exact_kfe_diagonal_linear_and_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 2, stride=1, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(48, 3)).to(DT)
    x, y = torch.randn(5, 2, 3, 3, dtype=DT), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    table = find_layers(net)
    ek = ekfac_factors(net, loss, x, y, table)
    ggn = dense_ggn(net, loss, x, y)
    for layer in table.layers:
        b = block(ggn, layer_index(net, layer))
        _close(ek[layer.name].scalings, _kfe_diag(b, ek[layer.name]))
    # empirical: second moments of the per-example gradients
    ek_emp = ekfac_factors(net, loss, x, y, table, fisher="empirical")
    ef = dense_empirical_fisher(net, loss, x, y)
    for layer in table.layers:
        _close(ek_emp[layer.name].scalings,
               _kfe_diag(block(ef, layer_index(net, layer)), ek_emp[layer.name]))


def test_ekfac_single_example_equals_kfac_eigenvalues():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(1, 3, dtype=DT), torch.tensor([0])
    table = find_layers(net)
    ek = ekfac_factors(net, nn.CrossEntropyLoss(), x, y, table)
    kf = kfac_factors(net, nn.CrossEntropyLoss(), x, y, table)
    for layer in table.layers:
        f, e = kf[layer.name], ek[layer.name]
        kfac_diag = torch.outer(torch.diagonal(e.U_G.T @ f.G @ e.U_G),
                                torch.diagonal(e.U_A.T @ f.A @ e.U_A))
        _close(e.scalings, kfac_diag)
        _close(e.block(), torch.kron(f.G, f.A))


def test_ekfac_operator_and_inverse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))) for _ in range(2)]
    K = KFAC(net, nn.CrossEntropyLoss(), data, ekfac=True)
    ggn = GGN(net, nn.CrossEntropyLoss(), data).to_dense()
    kfac_err, ekfac_err = 0.0, 0.0
    Kk = KFAC(net, nn.CrossEntropyLoss(), data).to_dense()
    for layer in K.layers:
        idx = layer_index(net, layer)
        b = block(ggn, idx)
        e = K.ekfac_factors[layer.name]
        _close(e.scalings, _kfe_diag(b, e))  # exact diagonal in the KFE, two batches
        ekfac_err += (block(K.to_dense(), idx) - b).norm() ** 2
        kfac_err += (block(Kk, idx) - b).norm() ** 2
    assert ekfac_err <= kfac_err  # George et al.: EKFAC is the better fit in the KFE (Frobenius)
    v = torch.randn(K.shape[0], dtype=DT)
    inv = K.inverse(1e-3)
    _close(K @ (inv @ v) + 1e-3 * (inv @ v), v, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="ekfac=True needs method='eigen'"):
        K.inverse(1e-3, method="factored")


# ------------------------------------------------------------------ tridiagonal


def _dense_chain_inverse(ft: TridiagonalFactors, inv: TridiagonalInverse) -> torch.Tensor:
    """Ξᵀ Λ Ξ from dense blocks of the damped F̃ (the oracle)."""
    n = len(ft.diag)
    diag = [torch.kron(g, a) for g, a in zip(inv.G_damped, inv.A_damped, strict=True)]
    off = [torch.kron(cg, ca) for cg, ca in zip(ft.cross_G, ft.cross_A, strict=True)]
    sizes = [d.shape[0] for d in diag]
    o = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    xi = torch.eye(o[-1], dtype=DT)
    lam = torch.zeros(o[-1], o[-1], dtype=DT)
    for i in range(n):
        if i < n - 1:
            psi = off[i] @ torch.linalg.inv(diag[i + 1])
            xi[o[i]:o[i + 1], o[i + 1]:o[i + 2]] = -psi
            sigma = diag[i] - psi @ diag[i + 1] @ psi.T
        else:
            sigma = diag[i]
        lam[o[i]:o[i + 1], o[i]:o[i + 1]] = torch.linalg.inv(sigma)
    return xi.T @ lam @ xi, o


def test_tridiagonal_inverse_against_dense_chain_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Tanh(),
                        nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 3, (7,))
    table = find_layers(net)
    ft = tridiagonal_factors(net, nn.CrossEntropyLoss(), x, y, table)
    inv = TridiagonalInverse(ft, damping=1e-2)
    p_inv, o = _dense_chain_inverse(ft, inv)
    vs = [torch.randn(4, 4, dtype=DT), torch.randn(5, 5, dtype=DT), torch.randn(3, 6, dtype=DT)]
    flat = torch.cat([v.reshape(-1) for v in vs])
    got = torch.cat([u.reshape(-1) for u in inv.apply(vs)])
    _close(got, p_inv @ flat)
    # F̂⁻¹ is block-tridiagonal; F̂ matches the damped F̃ on the tridiagonal band
    assert torch.count_nonzero(p_inv[o[0]:o[1], o[2]:o[3]]) == 0
    f_hat = torch.linalg.inv(p_inv)
    damped = ft.dense().clone()
    for i in range(3):
        damped[o[i]:o[i + 1], o[i]:o[i + 1]] = torch.kron(inv.G_damped[i], inv.A_damped[i])
    for i in range(3):
        for j in range(max(0, i - 1), min(3, i + 2)):
            _close(f_hat[o[i]:o[i + 1], o[j]:o[j + 1]], damped[o[i]:o[i + 1], o[j]:o[j + 1]],
                   rtol=1e-7, atol=1e-9)


def test_tridiagonal_operator_deep_linear_equals_ggn_band():
    net = _deep_linear()
    data = _batches(2)
    K = KFAC(net, nn.MSELoss(), data, structure="block-tridiagonal")
    ggn = GGN(net, nn.MSELoss(), data).to_dense()
    idx = [layer_index(net, layer) for layer in K.layers]
    dense = K.to_dense()
    for i in range(3):
        for j in range(3):
            want = block(ggn, idx[i], idx[j]) if abs(i - j) <= 1 else torch.zeros(
                len(idx[i]), len(idx[j]), dtype=DT)
            _close(block(dense, idx[i], idx[j]), want)
    # its inverse operator applies Martens' F̂⁻¹ (checked against the dense oracle above)
    inv = K.inverse(1e-2, method="factored")
    p_inv, _ = _dense_chain_inverse(K.tridiagonal, inv.tridiagonal)
    perm = torch.cat(idx)
    dense_inv = inv.to_dense()
    _close(dense_inv[perm[:, None], perm[None, :]], p_inv)


def test_tridiagonal_rejects_conv():
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 1)).to(DT)
    with pytest.raises(ValueError, match=r"chains of nn\.Linear"):
        KFAC(net, nn.MSELoss(), (torch.randn(2, 1, 2, 2, dtype=DT), torch.randn(2, 1, dtype=DT)),
             structure="block-tridiagonal")


def test_operator_grouped_conv_block_diagonal_over_groups_and_inverse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                        nn.Linear(6, 3)).to(DT)
    data = (torch.randn(1, 4, 3, 3, dtype=DT), torch.tensor([2]))
    K = KFAC(net, nn.CrossEntropyLoss(), data)
    ggn = GGN(net, nn.CrossEntropyLoss(), data).to_dense()
    _close(K.to_dense(), _block_diagonal_part(ggn, net, K.layers))
    g0, g1 = (layer_index(net, layer) for layer in K.layers[:2])
    assert torch.count_nonzero(K.to_dense()[g0[:, None], g1[None, :]]) == 0
    v = torch.randn(K.shape[0], dtype=DT)
    for method in ("eigen", "factored"):
        inv = K.inverse(0.1, method=method)
        assert torch.isfinite(inv @ v).all()
    inv = K.inverse(0.1)
    _close(K @ (inv @ v) + 0.1 * (inv @ v), v, rtol=1e-8, atol=1e-10)
