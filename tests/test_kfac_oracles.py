"""Dense float64 oracles for the K-FAC tests (explicit Jacobians, no curvlab operators)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.func.losses import loss_rule


def flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return names, shapes, theta


def _call(model: nn.Module, names, shapes, theta: Tensor, x: Tensor) -> Tensor:
    chunks = torch.split(theta, [s.numel() for s in shapes])
    params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
    return torch.func.functional_call(model, params, (x,))


def jacobian(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(J, output)`` with ``J`` of shape ``(output.numel(), P)``."""
    names, shapes, theta = flat_params(model)
    out = _call(model, names, shapes, theta, x)
    jac = torch.func.jacrev(lambda t: _call(model, names, shapes, t, x))(theta)
    return jac.reshape(out.numel(), -1), out.detach()


def output_hessian(loss_fn, out: Tensor, y: Tensor) -> Tensor:
    h = torch.func.hessian(lambda o: loss_fn(o, y))(out)
    return h.reshape(out.numel(), out.numel())


def dense_ggn(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    jac, out = jacobian(model, x)
    return jac.T @ output_hessian(loss_fn, out, y) @ jac


def dense_empirical_fisher(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """``w Σ_n g_n g_nᵀ`` with per-example loss gradients, ``w = 1/N`` ('mean') or 1."""
    names, shapes, theta = flat_params(model)
    rule = loss_rule(loss_fn)
    grads = []
    for n in range(x.shape[0]):

        def f(t, n=n):
            return loss_fn(_call(model, names, shapes, t, x[n : n + 1]), y[n : n + 1])

        grads.append(torch.func.grad(f)(theta))
    g = torch.stack(grads)
    w = 1.0 / x.shape[0] if rule.reduction == "mean" else 1.0
    return w * g.T @ g


def layer_index(model: nn.Module, layer) -> Tensor:
    """Flat indices of the homogeneous row-major vec of ``[W | b]`` of ``layer``."""
    names, shapes, _ = flat_params(model)
    offsets = {}
    o = 0
    for n, s in zip(names, shapes, strict=True):
        offsets[n] = o
        o += s.numel()
    out_dim = layer.out_dim
    fan_in = layer.module.weight[0].numel()
    rows = range(out_dim) if layer.group is None else range(layer.group * out_dim,
                                                             (layer.group + 1) * out_dim)
    idx = []
    for r in rows:
        idx.extend(offsets[layer.weight] + r * fan_in + j for j in range(fan_in))
        if layer.bias is not None:
            idx.append(offsets[layer.bias] + r)
    return torch.tensor(idx)


def block(mat: Tensor, idx_i: Tensor, idx_j: Tensor | None = None) -> Tensor:
    idx_j = idx_i if idx_j is None else idx_j
    return mat[idx_i][:, idx_j]


def test_oracle_ggn_equals_hessian_for_linear_model_mse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    names, shapes, theta = flat_params(net)
    hess = torch.func.hessian(lambda t: nn.MSELoss()(_call(net, names, shapes, t, x), y))(theta)
    torch.testing.assert_close(dense_ggn(net, nn.MSELoss(), x, y), hess, rtol=1e-10, atol=1e-12)


def test_oracle_empirical_fisher_single_example_is_grad_outer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    names, shapes, theta = flat_params(net)
    g = torch.func.grad(lambda t: nn.CrossEntropyLoss()(_call(net, names, shapes, t, x), y))(theta)
    torch.testing.assert_close(
        dense_empirical_fisher(net, nn.CrossEntropyLoss(), x, y), torch.outer(g, g)
    )
