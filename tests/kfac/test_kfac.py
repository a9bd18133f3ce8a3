"""K-FAC layers, capture, factors and inverses against dense float64 oracles."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from _kfac_helpers import (
    block,
    dense_empirical_fisher,
    dense_ggn,
    layer_index,
    output_hessian,
)
from torch import nn

from curvlab.kfac import (
    EigenInverse,
    EighError,
    FactorCapture,
    FactoredInverse,
    KFACLayer,
    accumulate_factors,
    find_layers,
    input_factor,
    kfac_factors,
    output_factor,
    pi_tracenorm,
    safe_eigh,
)

DT = torch.float64
RTOL = 1e-8


def _close(a, b, rtol=RTOL, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _kron_block(f):
    return torch.kron(f.G, f.A)


def deep_linear(bias=True, sizes=(4, 3, 5, 2)):
    layers = [nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes)]
    return nn.Sequential(*layers).to(DT)


# ------------------------------------------------------------------ layers


def test_find_layers_table_and_dims():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2, bias=False))
    table = find_layers(net)
    assert [(l.name, l.kind, l.in_dim, l.out_dim) for l in table.layers] == [
        ("0", "conv2d", 19, 3),
        ("3", "linear", 12, 2),
    ]
    assert table.unsupported == {}
    text = str(table)
    assert "K-FAC conv2d" in text and "3.weight" in text


def test_unsupported_modules_warn_and_strict_raises():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d.*1\.weight, 1\.bias"):
        table = find_layers(net)
    assert table.unsupported == {"1": ["1.weight", "1.bias"]}
    assert "UNSUPPORTED" in str(table)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        find_layers(net, strict=True)
    # selecting only supported parameters: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_layers(net, params=["0.weight", "2.weight", "2.bias"])


def test_grouped_conv_registers_one_layer_per_group():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"grouped convolution \(groups=2\).*grouped_conv=True"):
        default = find_layers(net)
    assert default.unsupported == {"0": ["0.weight", "0.bias"]}
    with pytest.raises(ValueError, match="grouped_conv=True"):
        find_layers(net, strict=True)
    table = find_layers(net, params=["0.weight", "0.bias"], grouped_conv=True)
    assert [(l.name, l.group, l.in_dim, l.out_dim) for l in table.layers] == [
        ("0[0]", 0, 19, 3), ("0[1]", 1, 19, 3)]
    assert table.param_names == ["0.weight", "0.bias"]
    assert "conv2d group 1" in str(table)
    with pytest.raises(NotImplementedError, match="one KFACLayer per group"):
        KFACLayer("0", net[0], "0.weight", "0.bias", "conv2d")
    layer = table.layers[1]
    w, b = torch.randn(6, 2, 3, 3), torch.randn(6)
    m = layer.to_matrix(w, b)
    _close(m, torch.cat([w[3:].reshape(3, -1), b[3:, None]], 1))
    w1, b1 = layer.from_matrix(m)
    _close(w1, w[3:])
    _close(b1, b[3:])


def test_grouped_conv_factors_by_hand_and_single_example_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 2, stride=2, padding=1, groups=2).to(DT)
    x = torch.randn(3, 4, 3, 3, dtype=DT)
    table = find_layers(nn.Sequential(conv), grouped_conv=True)
    with FactorCapture(table) as cap:
        conv(x).sum().backward()
    for j, layer in enumerate(table.layers):
        patches = F.unfold(x[:, 2 * j:2 * j + 2], 2, padding=1, stride=2).transpose(1, 2)
        _close(cap.inputs[layer.name][0], patches)
        assert cap.output_grads[layer.name][0].shape == (3, 4, 3)
    # one example, one output location (T = 1): each group's block is the exact GGN sub-block
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                        nn.Linear(6, 3)).to(DT)
    x1, y1 = torch.randn(1, 4, 3, 3, dtype=DT), torch.tensor([2])
    ggn = dense_ggn(net, nn.CrossEntropyLoss(), x1, y1)
    table = find_layers(net, grouped_conv=True)
    fac = kfac_factors(net, nn.CrossEntropyLoss(), x1, y1, table)
    assert sorted(fac) == ["0[0]", "0[1]", "3"]
    for layer in table.layers:
        _close(_kron_block(fac[layer.name]), block(ggn, layer_index(net, layer)))


def test_bias_without_weight_is_unsupported():
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        with pytest.warns(UserWarning, match="bias selected without its weight"):
            find_layers(net, params=["0.bias"])


# ------------------------------------------------------------------ capture


def test_conv_patches_match_hand_unfold():
    torch.manual_seed(0)
    for stride, padding, dilation in [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), (1, 2))]:
        conv = nn.Conv2d(2, 3, (3, 2), stride=stride, padding=padding, dilation=dilation).to(DT)
        x = torch.randn(2, 2, 7, 6, dtype=DT)
        layer = find_layers(nn.Sequential(conv)).layers[0]
        with FactorCapture([layer]) as cap:
            out = conv(x)
        patches = cap.inputs["0"][0]
        # by hand: loop over output positions
        s = (stride, stride) if isinstance(stride, int) else stride
        p = (padding, padding) if isinstance(padding, int) else padding
        d = (dilation, dilation) if isinstance(dilation, int) else dilation
        xp = F.pad(x, [p[1], p[1], p[0], p[0]])
        rows = []
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                win = xp[
                    :,
                    :,
                    i * s[0] : i * s[0] + d[0] * 2 + 1 : d[0],
                    j * s[1] : j * s[1] + d[1] * 1 + 1 : d[1],
                ]
                rows.append(win.reshape(2, -1))
        hand = torch.stack(rows, 1)
        _close(patches, hand)
        # A by hand: sum over locations, mean over examples, ones column last
        ah = torch.cat([hand, torch.ones_like(hand[..., :1])], -1).flatten(0, 1)
        _close(input_factor(layer, patches), ah.T @ ah / 2)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_same_padding_patches_reproduce_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 4, padding="same", bias=False).to(DT)
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    layer = find_layers(nn.Sequential(conv)).layers[0]
    with FactorCapture([layer]) as cap:
        out = conv(x)
    y = cap.inputs["0"][0] @ conv.weight.reshape(3, -1).T
    _close(y.transpose(1, 2).reshape(out.shape), out.detach())


def test_hooks_survive_inplace_relu():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    res = []
    for inplace in (False, True):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 2)).to(DT)
        res.append(kfac_factors(net, nn.CrossEntropyLoss(), x, y, find_layers(net)))
    for name in ("0", "2"):
        _close(res[0][name].A, res[1][name].A)
        _close(res[0][name].G, res[1][name].G)
    # and the recorded gradient is the pre-activation gradient
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)).to(DT)
    with FactorCapture(find_layers(net)) as cap:
        net(x).sum().backward()
    with torch.no_grad():
        pre = net[0](x)
    expected = (pre > 0).to(DT) * net[2].weight[0]
    _close(cap.output_grads["0"][0][:, 0], expected)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.out = nn.Linear(2, 1)

    def forward(self, x):  # fc is used functionally: its hooks never fire
        return self.out(F.linear(x, self.fc.weight, self.fc.bias))


def test_verify_names_layer_whose_hook_never_fires():
    net = _Functional().to(DT)
    with FactorCapture(find_layers(net)) as cap:
        net(torch.randn(2, 3, dtype=DT)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'fc' \(no forward inputs, no output gradients\)"):
        cap.verify()
    with pytest.raises(RuntimeError, match="'fc'"):
        kfac_factors(
            net,
            nn.MSELoss(),
            torch.randn(2, 3, dtype=DT),
            torch.randn(2, 1, dtype=DT),
            find_layers(net),
        )


# ------------------------------------------------------------------ exact identities


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_deep_linear_mse_type2_equals_block_diagonal_ggn(reduction, bias):
    torch.manual_seed(0)
    net = deep_linear(bias=bias)
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 2, dtype=DT)
    loss = nn.MSELoss(reduction=reduction)
    ggn = dense_ggn(net, loss, x, y)
    table = find_layers(net)
    fac = kfac_factors(net, loss, x, y, table)
    for layer in table.layers:
        idx = layer_index(net, layer)
        _close(_kron_block(fac[layer.name]), block(ggn, idx))


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.MSELoss(),
        nn.BCEWithLogitsLoss(),
    ],
)
def test_single_example_equals_each_ggn_block(loss):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 3)
    ).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    if isinstance(loss, nn.CrossEntropyLoss):
        y = torch.tensor([2])
    elif isinstance(loss, nn.BCEWithLogitsLoss):
        y = torch.rand(1, 3, dtype=DT)
    else:
        y = torch.randn(1, 3, dtype=DT)
    ggn = dense_ggn(net, loss, x, y)
    table = find_layers(net)
    fac = kfac_factors(net, loss, x, y, table)
    for layer in table.layers:
        _close(_kron_block(fac[layer.name]), block(ggn, layer_index(net, layer)))


def test_conv_single_location_single_example_equals_ggn_block():
    torch.manual_seed(0)
    # kernel covers the image: one output location (T = 1), so KFC is exact for one example
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(1, 2, 3, 3, dtype=DT), torch.tensor([1])
    ggn = dense_ggn(net, nn.CrossEntropyLoss(), x, y)
    table = find_layers(net)
    fac = kfac_factors(net, nn.CrossEntropyLoss(), x, y, table)
    for layer in table.layers:
        _close(_kron_block(fac[layer.name]), block(ggn, layer_index(net, layer)))


def test_conv_factors_by_hand_kfc_convention():
    """A = Σ_{n,t} āāᵀ/N, G = Σ_k Σ_{n,t} δδᵀ/T from explicit output Jacobians."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, stride=2, padding=1, dilation=1).to(DT)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)).to(DT)
    x, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(3, 2, dtype=DT)
    loss = nn.MSELoss()
    fac = kfac_factors(net, loss, x, y, find_layers(net))["0"]
    # explicit: d(output)/d(conv output) via jacrev of the tail
    s = conv(x).detach()
    tail = nn.Sequential(*list(net)[1:])
    jt = torch.func.jacrev(tail)(s)  # (3, 2, 3, 3, 3, 3) : out(n, o) x s(m, c, h, w)
    jt = jt.reshape(6, 3, 3, 9)  # rows (n,o), cols (m, c, t)
    out = tail(s).detach()
    hl = output_hessian(loss, out, y)
    evals, evecs = torch.linalg.eigh(hl)
    root = evecs * evals.clamp_min(0).sqrt()  # hl = root rootᵀ
    delta = torch.einsum("rk,rmct->kmtc", root, jt)  # per column k: (N, T, C)
    g_hand = torch.einsum("kmtc,kmtd->cd", delta, delta) / 9
    _close(fac.G, g_hand)
    patches = F.unfold(x, 2, padding=1, stride=2).transpose(1, 2)
    ph = torch.cat([patches, torch.ones_like(patches[..., :1])], -1).flatten(0, 1)
    _close(fac.A, ph.T @ ph / 3)


def test_mc_factors_converge_to_type2():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    table = find_layers(net)
    exact = kfac_factors(net, nn.CrossEntropyLoss(), x, y, table)
    gen = torch.Generator().manual_seed(0)
    mc = kfac_factors(
        net, nn.CrossEntropyLoss(), x, y, table, fisher="mc", mc_samples=4000, generator=gen
    )
    for name in exact:
        _close(mc[name].A, exact[name].A)
        err = (mc[name].G - exact[name].G).norm() / exact[name].G.norm()
        assert err < 0.05, (name, float(err))
    few = kfac_factors(
        net,
        nn.CrossEntropyLoss(),
        x,
        y,
        table,
        fisher="mc",
        mc_samples=2,
        generator=torch.Generator().manual_seed(0),
    )
    err_few = (few["2"].G - exact["2"].G).norm() / exact["2"].G.norm()
    assert err_few > (mc["2"].G - exact["2"].G).norm() / exact["2"].G.norm()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_factors_vs_per_example_gradients(reduction):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss(reduction=reduction)
    table = find_layers(net)
    fac = kfac_factors(net, loss, x, y, table, fisher="empirical")
    # per-example output-layer gradients g_n = p_n - e_{y_n}: G = w Σ g gᵀ
    p = net(x).softmax(1).detach()
    g = p - F.one_hot(y, 3).to(DT)
    w = 1 / 5 if reduction == "mean" else 1.0
    _close(fac["2"].G, w * g.T @ g)
    # single example: K-FAC equals the empirical Fisher block exactly
    ef = dense_empirical_fisher(net, loss, x[:1], y[:1])
    fac1 = kfac_factors(net, loss, x[:1], y[:1], table, fisher="empirical")
    for layer in table.layers:
        _close(_kron_block(fac1[layer.name]), block(ef, layer_index(net, layer)))


def test_output_factor_from_training_backward_matches_empirical():
    """The optimizer's own loss.backward() + output_factor(fisher='empirical') path."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    table = find_layers(net)
    ref = kfac_factors(net, nn.CrossEntropyLoss(), x, y, table, fisher="empirical")
    with FactorCapture(table) as cap:
        nn.CrossEntropyLoss()(net(x), y).backward()
    for layer in table.layers:
        _close(input_factor(layer, cap.inputs[layer.name]), ref[layer.name].A)
        _close(
            output_factor(layer, cap.output_grads[layer.name], 6, fisher="empirical"),
            ref[layer.name].G,
        )


def test_accumulate_equals_concatenated_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(9, 3, dtype=DT), torch.randn(9, 2, dtype=DT)
    table = find_layers(net)
    for reduction in ("mean", "sum"):
        loss = nn.MSELoss(reduction=reduction)
        whole = kfac_factors(net, loss, x, y, table)
        parts = [
            kfac_factors(net, loss, x[:4], y[:4], table),
            kfac_factors(net, loss, x[4:], y[4:], table),
        ]
        acc = accumulate_factors(parts, reduction)
        for name in whole:
            _close(acc[name].A, whole[name].A)
            _close(acc[name].G, whole[name].G)
            assert acc[name].num_examples == 9


def test_factors_do_not_touch_model_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning):
        table = find_layers(net)
    kfac_factors(net, nn.MSELoss(), torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT), table)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


def test_bad_fisher_type():
    net = deep_linear()
    with pytest.raises(ValueError, match="fisher must be one of"):
        kfac_factors(
            net,
            nn.MSELoss(),
            torch.randn(2, 4, dtype=DT),
            torch.randn(2, 2, dtype=DT),
            find_layers(net),
            fisher="exact",
        )


# ------------------------------------------------------------------ inverses


def _random_factors(seed=0, d_in=4, d_out=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, 2 * d_in, generator=g, dtype=DT)
    b = torch.randn(d_out, 2, generator=g, dtype=DT)  # rank-deficient G
    return a @ a.T / 8, b @ b.T


def test_eigen_inverse_is_tikhonov_on_product():
    A, G = _random_factors()
    inv = EigenInverse(A, G, damping=0.3)
    k_damped = torch.kron(G, A) + 0.3 * torch.eye(12, dtype=DT)
    v = torch.randn(5, 3, 4, dtype=DT)  # batched
    out = inv.apply(v)
    back = (k_damped @ out.reshape(5, 12).T).T.reshape(5, 3, 4)
    _close(back, v)
    _close(inv.damped_matrix(), k_damped)


def test_factored_inverse_pi_split():
    A, G = _random_factors(1)
    lam = 0.2
    inv = FactoredInverse(A, G, damping=lam)
    pi = pi_tracenorm(A, G)
    assert inv.pi == pytest.approx(pi)
    assert pi == pytest.approx(((A.trace() / 4) / (G.trace() / 3)).sqrt().item())
    r = lam**0.5
    k_damped = torch.kron(G + r / pi * torch.eye(3, dtype=DT), A + pi * r * torch.eye(4, dtype=DT))
    _close(inv.damped_matrix(), k_damped)
    v = torch.randn(3, 4, dtype=DT)
    _close((k_damped @ inv.apply(v).reshape(-1)).reshape(3, 4), v)
    # the two damping semantics differ
    assert not torch.allclose(inv.apply(v), EigenInverse(A, G, lam).apply(v))


def test_safe_eigh_guards():
    with pytest.raises(EighError, match="non-finite"):
        safe_eigh(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    d, u = safe_eigh(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT))  # symmetrized
    _close(u @ torch.diag(d) @ u.T, torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT).clamp(0))
    with pytest.raises(ValueError, match="zero eigenvalue"):
        EigenInverse(torch.zeros(2, 2), torch.eye(1), damping=0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 2\)"):
        EigenInverse(torch.eye(2), torch.eye(1), damping=1.0).apply(torch.ones(2, 1))


def test_linear_on_sequences_uses_locations():
    """Linear on (N, S, in): A sums over positions / N, G averages over positions (KFC form)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 5, 2, dtype=DT)
    fac = kfac_factors(net, nn.MSELoss(reduction="sum"), x, y, find_layers(net))["0"]
    xh = torch.cat([x, torch.ones_like(x[..., :1])], -1).reshape(-1, 4)
    _close(fac.A, xh.T @ xh / 4)
    _close(fac.G, 2.0 * torch.eye(2, dtype=DT) * 4)  # MSE 'sum': Σ_{n,t} 2I / T = 2N I


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def test_weight_sharing_follows_kfac_expand():
    """A layer called twice: its calls are extra locations (K-FAC-expand), paired exactly."""
    torch.manual_seed(0)
    net = _Shared().to(DT)
    x, y = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    fac = kfac_factors(net, nn.MSELoss(reduction="sum"), x, y, find_layers(net))["fc"]
    h = net.fc(x)
    a2 = torch.tanh(h)
    out = net.fc(a2)
    ones = torch.ones(3, 1, dtype=DT)
    abar = torch.stack([torch.cat([x, ones], 1), torch.cat([a2, ones], 1)], 1)  # (N, R, 3)
    _close(fac.A, torch.einsum("nri,nrj->ij", abar, abar) / 3)
    g_total = torch.zeros(2, 2, dtype=DT)
    for k in range(2):  # MSE 'sum' sqrt-Hessian columns: √2 e_k per example
        cot = torch.zeros_like(out)
        cot[:, k] = 2**0.5
        d_out, d_h = torch.autograd.grad(out, [out, h], cot, retain_graph=True)
        for d in (d_h, d_out):
            g_total += d.T @ d
    _close(fac.G, g_total / 2)  # mean over the R = 2 calls, as over locations


def test_safe_eigh_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge (simulated)")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    d, _ = safe_eigh(torch.diag(torch.tensor([2.0, 1.0])))
    assert calls == [torch.float32, torch.float64]
    assert d.dtype == torch.float32 and torch.allclose(d, torch.tensor([1.0, 2.0]))
