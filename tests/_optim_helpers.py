"""Dense float64 oracles shared by the K-FAC / NGD optimizer tests (explicit Jacobians)."""

from __future__ import annotations

import _oracles
import torch
from torch import Tensor, nn

from curvlab.func.params import cloned_buffers


def dense_ggn(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """The shared dense GGN oracle (:mod:`_oracles`) over all parameters."""
    return _oracles.dense_ggn(model, loss_fn, x, y, _oracles.all_names(model))

def flat_grad(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the batch loss (buffers untouched)."""
    params = dict(model.named_parameters())
    out = torch.func.functional_call(model, (params, cloned_buffers(model)), (x,))
    g = torch.autograd.grad(loss_fn(out, y), list(params.values()))
    return torch.cat([t.reshape(-1) for t in g])


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def layer_slices(model: nn.Module) -> list[slice]:
    """Flat slices of each (weight, bias) pair of a Sequential of Linear layers."""
    out, start = [], 0
    for mod in model:
        if isinstance(mod, nn.Linear):
            size = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
            out.append(slice(start, start + size))
            start += size
    return out


def v_order(out_dim: int, in_dim: int, bias: bool) -> Tensor:
    """Permutation ``perm`` with ``flat_block[perm] = vec_row([W | b])``."""
    idx = []
    for o in range(out_dim):
        idx.extend(o * in_dim + i for i in range(in_dim))
        if bias:
            idx.append(out_dim * in_dim + o)
    return torch.tensor(idx)
