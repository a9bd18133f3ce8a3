r"""Per-module tangent rules of the layer-wise linearization engine: one table, one entry a layer.

A rule splits a module's forward into a *primal* step, run once by :func:`curvlab.func.linearize`
(it returns the output and whatever the tangent step needs), and a *tangent* step, run for every
Jacobian-vector product :math:`v \mapsto Jv` without re-running the forward:

* ``primal(mod, x, p, update) -> (out, ctx)``, where ``p`` maps the module's own parameter
  names to tensors (aliases of selected parameters, or the module's constants) and ``update``
  says whether buffers (BatchNorm running statistics) may be updated;
* ``tangent(mod, ctx, tx, tp) -> tangent of out``, where ``tx`` is the input tangent (or
  ``None``) and ``tp`` maps the parameter names to tangents or ``None``.

Supporting a new layer is one entry in :data:`MODULE_RULES`. Layers without an entry are run
through ``torch.func.jvp`` on that node alone by the engine (correct, one extra node forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODULE_RULES", "ModuleRule", "Tangent", "add_tangents", "module_rule"]

Tangent = Tensor | None | tuple


def add_tangents(a: Tangent, b: Tangent) -> Tangent:
    """``a + b`` where ``None`` is a zero tangent."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


# ----------------------------------------------------------------------------------------
# module rules (see the module docstring for the primal/tangent protocol)


class ModuleRule:
    """Primal and tangent step of one module type (abstract base)."""

    def primal(self, mod: nn.Module, x: Tensor, p: dict[str, Tensor], update: bool) -> tuple:
        raise NotImplementedError

    def tangent(self, mod: nn.Module, ctx: Any, tx: Tangent, tp: dict[str, Tensor | None]):
        raise NotImplementedError


class LinearRule(ModuleRule):
    def primal(self, mod, x, p, update):
        return F.linear(x, p["weight"], p.get("bias")), (x, p["weight"])

    def tangent(self, mod, ctx, tx, tp):
        x, w = ctx
        tw, tb = tp.get("weight"), tp.get("bias")
        if tw is None:
            out = None if tx is None else F.linear(tx, w, tb)
            if out is None and tb is not None:
                out = tb.expand(*x.shape[:-1], tb.shape[-1])
            return out
        out = F.linear(x, tw, tb)  # bias tangent fused into the matmul
        if tx is not None:
            if (
                out.dim() == 2
                and tx.dim() == 2
                and out.dtype == tx.dtype == w.dtype
                and not torch._C._functorch.is_batchedtensor(out)
            ):
                out.addmm_(tx, w.t())  # accumulate W tx without a separate add pass
            else:
                out = out + F.linear(tx, w)
        return out


class ConvRule(ModuleRule):
    _fns = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def _conv(self, mod, x, w, b=None):
        fn = self._fns[len(mod.kernel_size)]
        return fn(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)

    def primal(self, mod, x, p, update):
        return self._conv(mod, x, p["weight"], p.get("bias")), (x, p["weight"])

    def tangent(self, mod, ctx, tx, tp):
        x, w = ctx
        tw, tb = tp.get("weight"), tp.get("bias")
        if tx is not None and tw is not None and mod.groups == 1:
            # W * tx + tW * x as ONE convolution over concatenated input channels
            return self._conv(mod, torch.cat([tx, x], 1), torch.cat([w, tw], 1), tb)
        out = None
        if tx is not None:
            out = self._conv(mod, tx, w, tb)
        elif tw is not None:
            out = self._conv(mod, x, tw, tb)
        else:
            out = self._conv(mod, torch.zeros_like(x), w, tb)  # bias tangent only
        if tx is not None and tw is not None:  # grouped convolution
            out = out + self._conv(mod, x, tw)
        return out


class BatchNormRule(ModuleRule):
    def primal(self, mod, x, p, update):
        w, b = p.get("weight"), p.get("bias")
        use_batch_stats = mod.training or mod.running_mean is None
        dims = [d for d in range(x.dim()) if d != 1]
        if use_batch_stats:
            if update and mod.training and mod.track_running_stats:
                mod.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(mod.num_batches_tracked) if mod.momentum is None else mod.momentum
                )
                out = F.batch_norm(x, mod.running_mean, mod.running_var, w, b, True, factor,
                                   mod.eps)
            else:
                out = F.batch_norm(x, None, None, w, b, True, 0.0, mod.eps)
            with torch.no_grad():
                xd = x.detach()
                mean = xd.mean(dims, keepdim=True)
                rstd = (xd.var(dims, unbiased=False, keepdim=True) + mod.eps).rsqrt()
                xhat = (xd - mean) * rstd
        else:
            out = F.batch_norm(x, mod.running_mean, mod.running_var, w, b, False, 0.0, mod.eps)
            with torch.no_grad():
                rstd = _channel_view((mod.running_var + mod.eps).rsqrt(), x.dim())
                xhat = (x.detach() - _channel_view(mod.running_mean, x.dim())) * rstd
        return out, (use_batch_stats, dims, xhat, rstd, None if w is None else w.detach())

    def tangent(self, mod, ctx, tx, tp):
        use_batch_stats, dims, xhat, rstd, w = ctx
        out = None
        if tx is not None:
            if use_batch_stats:
                txhat = rstd * (
                    tx - tx.mean(dims, keepdim=True) - xhat * (tx * xhat).mean(dims, keepdim=True)
                )
            else:
                txhat = tx * rstd
            out = txhat if w is None else txhat * _channel_view(w, xhat.dim())
        if tp.get("weight") is not None:
            out = add_tangents(out, xhat * _channel_view(tp["weight"], xhat.dim()))
        if tp.get("bias") is not None:
            tb = _channel_view(tp["bias"], xhat.dim())
            out = tb.expand_as(xhat) if out is None else out + tb
        return out


class ElementwiseRule(ModuleRule):
    """Activation ``y = f(x)`` with derivative expressed through the output or input."""

    def __init__(self, derivative: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> None:
        self.derivative = derivative

    def primal(self, mod, x, p, update):
        out = mod(x)
        return out, (x, out)

    def tangent(self, mod, ctx, tx, tp):
        if tx is None:
            return None
        x, y = ctx
        return tx * self.derivative(mod, x.detach(), y.detach())


class LinearModuleRule(ModuleRule):
    """Modules linear in their input with no parameters (pooling averages, flatten, ...)."""

    def primal(self, mod, x, p, update):
        return mod(x), None

    def tangent(self, mod, ctx, tx, tp):
        return None if tx is None else mod(tx)


class MaxPoolRule(ModuleRule):
    _fns = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

    def primal(self, mod, x, p, update):
        spatial = x.dim() - 2
        out, idx = self._fns[spatial](
            x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
            return_indices=True,
        )
        return out, idx

    def tangent(self, mod, ctx, tx, tp):
        if tx is None:
            return None
        idx = ctx
        flat = tx.flatten(2).gather(2, idx.flatten(2))
        return flat.reshape(idx.shape)


class DropoutRule(ModuleRule):
    def primal(self, mod, x, p, update):
        if not mod.training or mod.p == 0.0:
            return x, None
        if mod.p == 1.0:
            mask = torch.zeros_like(x)
        else:
            mask = torch.empty_like(x).bernoulli_(1.0 - mod.p) / (1.0 - mod.p)
        return x * mask, mask

    def tangent(self, mod, ctx, tx, tp):
        if tx is None or ctx is None:
            return tx
        return tx * ctx


class EmbeddingRule(ModuleRule):
    """``nn.Embedding``: linear in the weight; the input (indices) carries no tangent.

    The tangent is the embedding of the weight tangent at the same indices. The row at
    ``padding_idx`` is a constant (PyTorch gives it zero gradient and never updates it), so its
    tangent is dropped as well and :math:`Jv` stays the adjoint of the backward.
    """

    def primal(self, mod, x, p, update):
        out = F.embedding(x, p["weight"], mod.padding_idx, None, mod.norm_type,
                          mod.scale_grad_by_freq, mod.sparse)
        return out, x

    def tangent(self, mod, ctx, tx, tp):
        tw = tp.get("weight")
        if tw is None:
            return None
        if mod.padding_idx is not None:
            keep = torch.ones(tw.shape[0], 1, dtype=tw.dtype, device=tw.device)
            keep[mod.padding_idx] = 0.0
            tw = tw * keep
        return F.embedding(ctx, tw)


class LayerNormRule(ModuleRule):
    r"""``nn.LayerNorm``: :math:`y = \hat x w + b`, statistics over ``normalized_shape``."""

    def primal(self, mod, x, p, update):
        w, b = p.get("weight"), p.get("bias")
        out = F.layer_norm(x, mod.normalized_shape, w, b, mod.eps)
        dims = tuple(range(-len(mod.normalized_shape), 0))
        with torch.no_grad():
            xd = x.detach()
            rstd = (xd.var(dims, unbiased=False, keepdim=True) + mod.eps).rsqrt()
            xhat = (xd - xd.mean(dims, keepdim=True)) * rstd
        return out, (dims, xhat, rstd, None if w is None else w.detach())

    def tangent(self, mod, ctx, tx, tp):
        dims, xhat, rstd, w = ctx
        out = None
        if tx is not None:
            txhat = rstd * (
                tx - tx.mean(dims, keepdim=True) - xhat * (tx * xhat).mean(dims, keepdim=True)
            )
            out = txhat if w is None else txhat * w
        if tp.get("weight") is not None:
            out = add_tangents(out, xhat * tp["weight"])
        if tp.get("bias") is not None:
            out = tp["bias"].expand_as(xhat) if out is None else out + tp["bias"]
        return out


class GELURule(ModuleRule):
    """``nn.GELU`` (exact or tanh approximation): tangent ``gelu'(x) * tx`` by PyTorch's own
    derivative kernel."""

    def primal(self, mod, x, p, update):
        return mod(x), x.detach()

    def tangent(self, mod, ctx, tx, tp):
        if tx is None:
            return None
        return torch.ops.aten.gelu_backward(tx, ctx, approximate=mod.approximate)


def _leaky_relu_derivative(mod, x, y):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, mod.negative_slope))


#: Module type -> tangent rule. Exact type match: subclasses go through the generic path.
MODULE_RULES: dict[type, ModuleRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
    nn.ReLU: ElementwiseRule(lambda m, x, y: (y > 0).to(y.dtype)),
    nn.LeakyReLU: ElementwiseRule(_leaky_relu_derivative),
    nn.Tanh: ElementwiseRule(lambda m, x, y: 1 - y * y),
    nn.Sigmoid: ElementwiseRule(lambda m, x, y: y * (1 - y)),
    nn.Identity: LinearModuleRule(),
    nn.Flatten: LinearModuleRule(),
    nn.Unflatten: LinearModuleRule(),
    nn.AvgPool1d: LinearModuleRule(),
    nn.AvgPool2d: LinearModuleRule(),
    nn.AvgPool3d: LinearModuleRule(),
    nn.AdaptiveAvgPool1d: LinearModuleRule(),
    nn.AdaptiveAvgPool2d: LinearModuleRule(),
    nn.AdaptiveAvgPool3d: LinearModuleRule(),
    nn.MaxPool1d: MaxPoolRule(),
    nn.MaxPool2d: MaxPoolRule(),
    nn.MaxPool3d: MaxPoolRule(),
    nn.Dropout: DropoutRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GELU: GELURule(),
}


def module_rule(mod: nn.Module) -> ModuleRule | None:
    """The rule for ``mod``, or ``None`` when the engine must use the generic per-node ``jvp``."""
    rule = MODULE_RULES.get(type(mod))
    if isinstance(rule, ConvRule) and mod.padding_mode != "zeros":
        return None
    if isinstance(rule, MaxPoolRule) and getattr(mod, "return_indices", False):
        return None
    if isinstance(rule, EmbeddingRule) and mod.max_norm is not None:  # renormalizes in place
        return None
    return rule

