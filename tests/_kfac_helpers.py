"""Dense float64 oracles for the K-FAC tests (explicit Jacobians, no curvlab operators)."""

from __future__ import annotations

import _oracles
import torch
from torch import Tensor, nn


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
    """The shared dense GGN oracle (:mod:`_oracles`) over all parameters."""
    return _oracles.dense_ggn(model, loss_fn, x, y, _oracles.all_names(model))


def dense_empirical_fisher(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """The shared dense empirical-Fisher oracle (:mod:`_oracles`) over all parameters."""
    return _oracles.dense_ef(model, loss_fn, x, y, _oracles.all_names(model))

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

