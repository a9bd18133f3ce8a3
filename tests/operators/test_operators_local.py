"""Tests for curvlab.operators.local.LocalGGN against dense float64 oracles (torch.func)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.func import linearize, loss_rule
from curvlab.func.params import cloned_buffers
from curvlab.operators import IdentityOperator, LinearOperator, LocalGGN

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
RTOL, ATOL = 1e-8, 1e-12


def _mlp() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = torch.randn(6, 3, dtype=F64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    return net, nn.CrossEntropyLoss(), x, y


def _cnn() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    ).to(F64)
    net.train()
    x = torch.randn(4, 2, 4, 4, dtype=F64)
    y = torch.randn(4, 2, dtype=F64)
    return net, nn.MSELoss(reduction="sum"), x, y


PROBLEMS = {"mlp": _mlp, "cnn_bn_train": _cnn}


def _oracle(net, loss_fn, x, y):
    """Dense J (M, P), H_L (M, M), G, gradient and output from torch.func, float64."""
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    buffers = cloned_buffers(net)  # BatchNorm in train mode: batch statistics, no update

    def f(w):
        ps = {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}
        return torch.func.functional_call(net, (ps, buffers), (x,))

    w = torch.cat([p.reshape(-1) for p in params.values()])
    out = f(w)
    m = out.numel()
    J = torch.func.jacrev(f)(w).reshape(m, -1)
    H = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(m, m)
    g = torch.func.grad(lambda w: loss_fn(f(w), y))(w)
    gout = torch.func.grad(lambda o: loss_fn(o, y))(out)
    return {"J": J, "H": H, "G": J.T @ H @ J, "g": g, "out": out, "gout": gout,
            "loss": loss_fn(out, y)}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("engine", ["layerwise", "functional"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_dense_and_products_match_oracle(problem: str, engine: str) -> None:
    net, loss_fn, x, y = PROBLEMS[problem]()
    ref = _oracle(net, loss_fn, x, y)
    G = LocalGGN(net, loss_fn, None, x, y, engine=engine)
    assert isinstance(G, LinearOperator) and G.symmetric is True
    p = ref["G"].shape[0]
    assert G.shape == (p, p) and G.dtype == F64

    _close(G.to_dense(), ref["G"])
    _close(G.to_dense(chunk_size=5, method="jvp"), ref["G"])
    _close(LinearOperator.to_dense(G), ref["G"])  # generic identity-column path through mv
    _close(G.jacobian(chunk_size=7), ref["J"])
    _close(G.jacobian(method="jvp"), ref["J"])

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(p, dtype=F64, generator=gen)
    b = torch.randn(p, dtype=F64, generator=gen)
    r = torch.randn(ref["out"].shape, dtype=F64, generator=gen)
    al, bl = G.unflatten(a), G.unflatten(b)
    ua, ub = G.jvp(al), G.jvp(bl)
    _close(ua.reshape(-1), ref["J"] @ a)
    _close(G.flatten(G.vjp(r)), ref["J"].T @ r.reshape(-1))
    _close(G.flatten(G.mv(al)), ref["G"] @ a)
    _close(G @ a, ref["G"] @ a)
    M = torch.stack([a, b], dim=1)
    _close(G @ M, ref["G"] @ M)
    _close(G.output_hvp(ub).reshape(-1), ref["H"] @ ub.reshape(-1))
    q = G.quadratic(ua, ub)
    assert q.dtype == F64 and q.ndim == 0
    _close(q, a @ ref["G"] @ b)
    _close(G.gradient_dot(ua), ref["g"] @ a)
    _close(G.flatten(G.gradient()), ref["g"])
    _close(G.grad_output, ref["gout"])
    _close(G.loss, ref["loss"])
    _close(G.output, ref["out"])
    # algebra and SciPy export
    damped = G + 0.5 * IdentityOperator.like(G)
    _close(damped @ a, ref["G"] @ a + 0.5 * a)
    sp = G.to_scipy()
    np.testing.assert_allclose(sp @ a.numpy(), (ref["G"] @ a).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_no_side_effects(problem: str) -> None:
    net, loss_fn, x, y = PROBLEMS[problem]()
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    G = LocalGGN(net, loss_fn, None, x, y)
    v = [torch.ones_like(p) for p in net.parameters()]
    G.mv(v), G.gradient(), G.to_dense(), G.to_dense(method="jvp"), G.quadratic(G.jvp(v), G.jvp(v))
    G @ torch.ones(G.shape[0], dtype=F64)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), params[n])
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_update_buffers_like_a_forward() -> None:
    net, loss_fn, x, y = _cnn()
    twin = copy.deepcopy(net)
    twin(x)
    LocalGGN(net, loss_fn, None, x, y, update_buffers=True)
    for (n, b), (_, b2) in zip(net.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, b2), n


def test_param_subset_and_dict_form() -> None:
    net, loss_fn, x, y = _mlp()
    ref = _oracle(net, loss_fn, x, y)["G"][-18:, -18:]  # last layer: 5*3 + 3 = 18 entries
    G = LocalGGN(net, loss_fn, ["2.weight", "2.bias"], x, y)
    assert G.param_names == ["2.weight", "2.bias"] and G.shape == (18, 18)
    _close(G.to_dense(), ref)
    v = {"2.weight": torch.ones(3, 5, dtype=F64), "2.bias": torch.zeros(3, dtype=F64)}
    out = G @ v
    assert list(out) == ["2.weight", "2.bias"]
    _close(G.flatten(out), ref @ G.flatten(v))


class _Scaled(nn.Module):
    """A linear layer times a 0-d parameter (of dtype ``scale_dtype``)."""

    def __init__(self, scale_dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(F64)
        self.s = nn.Parameter(torch.tensor(1.5, dtype=scale_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * self.s.to(x.dtype)


def test_zero_dim_parameter() -> None:
    torch.manual_seed(0)
    net, x, y = _Scaled(), torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    ref = _oracle(net, nn.MSELoss(), x, y)["G"]
    G = LocalGGN(net, nn.MSELoss(), None, x, y)
    assert torch.Size([]) in G.param_shapes
    _close(G.to_dense(), ref)
    v = torch.randn(G.shape[0], dtype=F64)
    _close(G @ v, ref @ v)


def test_from_linearization_is_bit_identical() -> None:
    net, loss_fn, x, y = _cnn()
    G1 = LocalGGN(net, loss_fn, None, x, y)
    lin = linearize(net, dict(net.named_parameters()), x)
    G2 = LocalGGN.from_linearization(lin, loss_rule(loss_fn), y)
    assert G2.linearization is lin and G2.counts["forward"] == 0 and G1.counts["forward"] == 1
    M = torch.randn(G1.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(G1 @ M, G2 @ M)
    assert torch.equal(G1.to_dense(), G2.to_dense())


def test_same_float_operations_as_the_optimizers() -> None:
    """LocalGGN reproduces, bit for bit, the optimizers' hand-written products (HF's CG
    operator, NaturalGradient's dense GGN, adaptive K-FAC's / CurveBall's quadratic model)."""
    net, loss_fn, x, y = _cnn()
    net = net.float()
    x, y = x.float(), y.float()
    rule = loss_rule(loss_fn)
    params = dict(net.named_parameters())
    shapes = [p.shape for p in params.values()]
    lin = linearize(net, params, x)
    out = lin.output.detach()
    G = LocalGGN.from_linearization(lin, rule, y)
    M = torch.randn(G.shape[0], 2, generator=torch.Generator().manual_seed(0))

    # Hessian-free: one jvp + loss-Hessian product + vjp per column
    from curvlab.func import flatten, unflatten

    cols = []
    for k in range(M.shape[1]):
        u = lin.jvp(unflatten(M[:, k], shapes))
        cols.append(flatten(lin.vjp(rule.hessian_vp(out, y, u))))
    assert torch.equal(G @ M, torch.stack(cols, dim=1))

    # NaturalGradient: explicit Jacobian rows in chunks, H_L on each column of J
    m, chunk = out.numel(), 3
    rows = []
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        cot = torch.zeros(stop - start, m, dtype=out.dtype)
        cot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        grads = lin.vjp_batched(cot.reshape(stop - start, *out.shape))
        rows.append(torch.cat([g.reshape(stop - start, -1) for g in grads], dim=1))
    jac = torch.cat(rows)
    hj = torch.func.vmap(lambda v: rule.hessian_vp(out, y, v))(jac.T.reshape(-1, *out.shape))
    assert torch.equal(G.to_dense(chunk_size=chunk), jac.T @ hj.reshape(-1, m).T)

    # K-FAC / CurveBall quadratic model entries and the gradient
    a = unflatten(M[:, 0], shapes)
    u, w = lin.jvp(a), lin.jvp(unflatten(M[:, 1], shapes))
    assert torch.equal(G.quadratic(u, w),
                       torch.sum(u * rule.hessian_vp(out, y, w), dtype=torch.float64))
    g_ref = lin.vjp(rule.grad(out, y))
    assert all(torch.equal(s, t) for s, t in zip(G.gradient(), g_ref))
    assert torch.equal(G.gradient_dot(u), torch.sum(rule.grad(out, y) * u, dtype=torch.float64))
    assert torch.equal(G.loss, rule.value(out, y).detach())


def test_counts() -> None:
    net, loss_fn, x, y = _mlp()
    G = LocalGGN(net, loss_fn, None, x, y)
    v = [torch.ones_like(p) for p in net.parameters()]
    G.mv(v)
    G @ torch.ones(G.shape[0], 3, dtype=F64)
    G.gradient()
    G.jacobian(chunk_size=5)  # 18 output entries -> 4 batched backward passes
    assert G.counts == {"forward": 1, "backward": 1 + 3 + 1 + 4, "jvp": 1 + 3,
                        "ggn_products": 1 + 3}


def test_bad_inputs_raise() -> None:
    net, loss_fn, x, y = _mlp()
    with pytest.raises(TypeError, match="loss_fn_or_rule"):
        LocalGGN(net, "mse", None, x, y)
    with pytest.raises(ValueError):
        LocalGGN(net, loss_fn, None, x, y[:3])
    with pytest.raises(TypeError, match="Linearization"):
        LocalGGN.from_linearization(object(), loss_fn, y)
    G = LocalGGN(net, loss_fn, None, x, y)
    with pytest.raises(ValueError, match="chunk_size"):
        G.jacobian(chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        G.to_dense(method="hessian")
    with pytest.raises(ValueError, match="dtype"):
        G @ torch.ones(G.shape[0])  # float32 vector for a float64 operator
    with pytest.raises(ValueError, match="common dtype"):
        LocalGGN(_Scaled(torch.float32), nn.MSELoss(), None, x, torch.zeros(6, 2, dtype=F64))
