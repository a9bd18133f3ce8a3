r"""Linearizing a model at its current parameters: one forward, many Jacobian products.

:func:`linearize` runs the model's forward **once**, recording the autograd graph to the selected
parameters (for :math:`J^\top r` products, i.e. ``vjp``), and keeps the per-layer primal values
needed to push any number of tangents :math:`v \mapsto Jv` through the network without running
the forward again. This is the structure a GGN product wants (one forward, one tangent pass, one
backward: about 1.6x a gradient on an MLP by matmul count), and what CurveBall wants (two
tangents at the same point, one forward).

Two engines:

``"layerwise"``
    The model is traced with ``torch.fx``; each node gets a tangent rule. Hand-written rules
    cover ``Linear``, ``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d`` (train and eval), ``ReLU``,
    ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``Dropout``, max/avg pooling, ``Flatten``,
    ``Identity``, additions and shape operations. Any other module or function is handled by
    ``torch.func.jvp`` on that node alone (correct, costs one extra forward of that node).
``"functional"``
    Fallback for models ``torch.fx`` cannot trace (data-dependent control flow): each tangent is
    ``torch.func.jvp`` of the whole model (one extra forward per product), the RNG state replayed
    so dropout masks match.

``"auto"`` (default) uses ``"layerwise"`` when tracing succeeds.

Buffers: with ``update_buffers=False`` (the default, used by every curvature operator) nothing
the model owns is modified: BatchNorm in train mode normalizes with batch statistics without
touching ``running_mean``/``running_var``. Optimizers pass ``update_buffers=True`` so the one
forward of a training step updates running statistics exactly once, like ``model(x)`` would.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from curvlab.func.params import cloned_buffers

__all__ = ["Linearization", "linearize"]

Tangent = Tensor | None | tuple


# ----------------------------------------------------------------------------------------
# helpers


def _add(a: Tangent, b: Tangent) -> Tangent:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


# ----------------------------------------------------------------------------------------
# module rules: primal(mod, x, p) -> (out, ctx); tangent(mod, ctx, tx, tp) -> tangent
# ``p`` maps the module's own parameter names to tensors (aliases of selected parameters, or
# the module's constants); ``tp`` maps them to tangents or None.


class _ModuleRule:
    def primal(self, mod: nn.Module, x: Tensor, p: dict[str, Tensor], update: bool) -> tuple:
        raise NotImplementedError

    def tangent(self, mod: nn.Module, ctx: Any, tx: Tangent, tp: dict[str, Tensor | None]):
        raise NotImplementedError


class _LinearRule(_ModuleRule):
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


class _ConvRule(_ModuleRule):
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


class _BatchNormRule(_ModuleRule):
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
            out = _add(out, xhat * _channel_view(tp["weight"], xhat.dim()))
        if tp.get("bias") is not None:
            tb = _channel_view(tp["bias"], xhat.dim())
            out = tb.expand_as(xhat) if out is None else out + tb
        return out


class _ElementwiseRule(_ModuleRule):
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


class _LinearModuleRule(_ModuleRule):
    """Modules linear in their input with no parameters (pooling averages, flatten, ...)."""

    def primal(self, mod, x, p, update):
        return mod(x), None

    def tangent(self, mod, ctx, tx, tp):
        return None if tx is None else mod(tx)


class _MaxPoolRule(_ModuleRule):
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


class _DropoutRule(_ModuleRule):
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


def _leaky_relu_derivative(mod, x, y):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, mod.negative_slope))


_MODULE_RULES: dict[type, _ModuleRule] = {
    nn.Linear: _LinearRule(),
    nn.Conv1d: _ConvRule(),
    nn.Conv2d: _ConvRule(),
    nn.Conv3d: _ConvRule(),
    nn.BatchNorm1d: _BatchNormRule(),
    nn.BatchNorm2d: _BatchNormRule(),
    nn.BatchNorm3d: _BatchNormRule(),
    nn.ReLU: _ElementwiseRule(lambda m, x, y: (y > 0).to(y.dtype)),
    nn.LeakyReLU: _ElementwiseRule(_leaky_relu_derivative),
    nn.Tanh: _ElementwiseRule(lambda m, x, y: 1 - y * y),
    nn.Sigmoid: _ElementwiseRule(lambda m, x, y: y * (1 - y)),
    nn.Identity: _LinearModuleRule(),
    nn.Flatten: _LinearModuleRule(),
    nn.Unflatten: _LinearModuleRule(),
    nn.AvgPool1d: _LinearModuleRule(),
    nn.AvgPool2d: _LinearModuleRule(),
    nn.AvgPool3d: _LinearModuleRule(),
    nn.AdaptiveAvgPool1d: _LinearModuleRule(),
    nn.AdaptiveAvgPool2d: _LinearModuleRule(),
    nn.AdaptiveAvgPool3d: _LinearModuleRule(),
    nn.MaxPool1d: _MaxPoolRule(),
    nn.MaxPool2d: _MaxPoolRule(),
    nn.MaxPool3d: _MaxPoolRule(),
    nn.Dropout: _DropoutRule(),
}


def _module_rule(mod: nn.Module) -> _ModuleRule | None:
    rule = _MODULE_RULES.get(type(mod))
    if isinstance(rule, _ConvRule) and mod.padding_mode != "zeros":
        return None
    if isinstance(rule, _MaxPoolRule) and getattr(mod, "return_indices", False):
        return None
    return rule


# functions linear in their first argument (other arguments carry no tangent)
_LINEAR_IN_FIRST = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, operator.getitem, operator.neg, torch.neg, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.sum, torch.mean,
}
_LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "sum", "mean", "__getitem__", "neg", "expand", "view_as", "reshape_as", "t", "mT",
}


# ----------------------------------------------------------------------------------------
# tracing


_TRACE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in _MODULE_RULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule | None:
    key = model.training
    cached = _TRACE_CACHE.get(model)
    if cached is not None and key in cached:
        return cached[key]
    try:
        graph = _Tracer().trace(model)
        gm: fx.GraphModule | None = fx.GraphModule(model, graph)
    except Exception as err:  # any tracing failure -> functional engine, said once per model
        gm = None
        warnings.warn(
            f"curvlab.linearize: torch.fx cannot trace {type(model).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
            "using the functional engine (one extra forward per Jacobian product). Pass "
            "engine='functional' to choose it explicitly and silence this warning.",
            stacklevel=3,
        )
    _TRACE_CACHE.setdefault(model, {})[key] = gm
    return gm


# ----------------------------------------------------------------------------------------
# linearization objects


@dataclass
class _TapeEntry:
    node: fx.Node
    kind: str  # "module", "generic_module", "function"
    target: Any
    ctx: Any = None
    param_keys: dict[str, str | None] = field(default_factory=dict)  # local -> selected name


class Linearization:
    r"""A model linearized at the current parameters (see :func:`linearize`).

    Attributes:
        output: The model output, with autograd graph to the selected parameters.
        names: Selected parameter names, in order.
        engine: ``"layerwise"`` or ``"functional"``.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> lin = linearize(net, dict(net.named_parameters()), torch.ones(4, 3))
        >>> u = lin.jvp([torch.ones(2, 3), torch.zeros(2)])     # J v: each output moves by 3
        >>> u[0]
        tensor([3., 3.])
        >>> [g.shape for g in lin.vjp(torch.ones_like(lin.output))]  # J^T r
        [torch.Size([2, 3]), torch.Size([2])]
    """

    output: Tensor
    names: list[str]
    engine: str

    def __init__(self, names: list[str], leaves: list[Tensor]) -> None:
        self.names = names
        self._leaves = leaves
        # the tangent passes replay the forward's autocast state (mixed precision)
        self._device_type = leaves[0].device.type if leaves else "cpu"
        self._autocast = (
            torch.is_autocast_enabled(self._device_type),
            torch.get_autocast_dtype(self._device_type),
        )

    def _autocast_context(self) -> torch.autocast:
        enabled, dtype = self._autocast
        return torch.autocast(self._device_type, dtype=dtype, enabled=enabled)

    # -- public -------------------------------------------------------------------------
    def jvp(self, tangents: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        r""":math:`J v`: tangent of the output for parameter tangents ``v`` (no graph kept).

        ``tangents`` is a dict keyed by the selected names or a list in their order; missing
        dict keys count as zero.
        """
        tdict = self._as_dict(tangents)
        with torch.no_grad(), self._autocast_context():
            out = self._jvp(tdict)
        return torch.zeros_like(self.output) if out is None else out

    def vjp(self, cotangent: Tensor, retain_graph: bool = True) -> list[Tensor]:
        r""":math:`J^\top r` for an output cotangent ``r``, as a list in ``names`` order."""
        if cotangent.shape != self.output.shape:
            raise ValueError(
                f"cotangent has shape {tuple(cotangent.shape)}, expected the output's shape "
                f"{tuple(self.output.shape)}"
            )
        grads = torch.autograd.grad(
            self.output, self._leaves, cotangent, retain_graph=retain_graph, allow_unused=True
        )
        return [
            torch.zeros_like(leaf) if g is None else g
            for g, leaf in zip(grads, self._leaves, strict=True)
        ]

    def jvp_batched(self, tangents: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Like :meth:`jvp` for tangents with a leading batch dimension ``K`` (via ``vmap``)."""
        tdict = self._as_dict(tangents, batched=True)
        return torch.func.vmap(self.jvp)(tdict)

    def vjp_batched(self, cotangents: Tensor, retain_graph: bool = True) -> list[Tensor]:
        """Like :meth:`vjp` for cotangents with a leading batch dimension ``K``."""
        grads = torch.autograd.grad(
            self.output, self._leaves, cotangents, retain_graph=retain_graph, allow_unused=True,
            is_grads_batched=True,
        )
        k = cotangents.shape[0]
        return [
            leaf.new_zeros(k, *leaf.shape) if g is None else g
            for g, leaf in zip(grads, self._leaves, strict=True)
        ]

    # -- internals ----------------------------------------------------------------------
    def _as_dict(self, tangents, batched: bool = False) -> dict[str, Tensor]:
        if isinstance(tangents, Mapping):
            unknown = set(tangents) - set(self.names)
            if unknown:
                raise ValueError(f"tangents: unknown parameter names {sorted(unknown)}")
            tdict = dict(tangents)
        else:
            tangents = list(tangents)
            if len(tangents) != len(self.names):
                raise ValueError(
                    f"tangents: got {len(tangents)} tensors, expected {len(self.names)} "
                    f"({self.names})"
                )
            tdict = dict(zip(self.names, tangents, strict=True))
        for name, leaf in zip(self.names, self._leaves, strict=True):
            t = tdict.get(name)
            if t is None:
                continue
            shape = t.shape[1:] if batched else t.shape
            if shape != leaf.shape:
                raise ValueError(
                    f"tangent for {name!r} has shape {tuple(t.shape)}, expected "
                    f"{tuple(leaf.shape)}" + (" after the batch dimension" if batched else "")
                )
        return tdict

    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        raise NotImplementedError


class _LayerwiseLinearization(Linearization):
    engine = "layerwise"

    def __init__(
        self,
        gm: fx.GraphModule,
        params: dict[str, Tensor],
        inputs: Any,
        update_buffers: bool,
    ) -> None:
        names = list(params)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        super().__init__(names, leaves)
        self._gm = gm
        self._update = update_buffers
        id_to_name = {id(p): n for n, p in params.items()}
        self._alias = {id(p): leaf for p, leaf in zip(params.values(), leaves, strict=True)}
        self._id_to_name = id_to_name
        self._tape: list[_TapeEntry] = []
        self._getattr_tangent: dict[fx.Node, str] = {}
        self._output_node: fx.Node | None = None
        with torch.enable_grad():
            self.output = self._forward(inputs)

    # primal pass ---------------------------------------------------------------------------
    def _module_params(self, mod: nn.Module, recurse: bool) -> tuple[dict, dict]:
        values, keys = {}, {}
        for local, p in mod.named_parameters(recurse=recurse):
            alias = self._alias.get(id(p))
            values[local] = p if alias is None else alias
            keys[local] = self._id_to_name.get(id(p))
        return values, keys

    def _forward(self, inputs: Any) -> Tensor:
        env: dict[fx.Node, Any] = {}
        placeholders = 0

        def load(a):
            return fx.node.map_arg(a, lambda n: env[n])

        for node in self._gm.graph.nodes:
            if node.op == "placeholder":
                if placeholders == 0:
                    env[node] = inputs
                elif node.args:
                    env[node] = node.args[0]
                else:
                    raise ValueError(
                        f"model.forward takes more than one required input ({node.target!r}); "
                        "curvlab passes a single `inputs` object (use a tuple/dict input)"
                    )
                placeholders += 1
            elif node.op == "get_attr":
                obj = self._gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, Tensor) and id(obj) in self._alias:
                    self._getattr_tangent[node] = self._id_to_name[id(obj)]
                    obj = self._alias[id(obj)]
                env[node] = obj
            elif node.op == "call_module":
                mod = self._gm.get_submodule(node.target)
                args, kwargs = load(node.args), load(node.kwargs)
                rule = _module_rule(mod)
                if rule is not None and len(args) == 1 and not kwargs:
                    values, keys = self._module_params(mod, recurse=False)
                    out, ctx = rule.primal(mod, args[0], values, self._update)
                    self._tape.append(_TapeEntry(node, "module", (mod, rule), ctx, keys))
                else:
                    out, ctx, keys = self._generic_module_primal(mod, args, kwargs)
                    self._tape.append(_TapeEntry(node, "generic_module", mod, ctx, keys))
                env[node] = out
            elif node.op in ("call_function", "call_method"):
                args, kwargs = load(node.args), load(node.kwargs)
                if node.op == "call_method":
                    fn = getattr(type(args[0]), node.target, None)
                    if fn is None:
                        fn = getattr(args[0], node.target).__func__
                else:
                    fn = node.target
                out = fn(*args, **kwargs)
                ctx = (args, kwargs, out) if _has_float_tensor(out) else None
                self._tape.append(_TapeEntry(node, "function", fn, ctx))
                env[node] = out
            elif node.op == "output":
                out = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if not isinstance(out, Tensor):
                    raise TypeError(
                        "linearize: the model must return a single tensor, got "
                        f"{type(load(node.args[0])).__name__}"
                    )
                self._output_node = node.args[0]
                return out
        raise RuntimeError("traced graph has no output node")  # pragma: no cover

    def _generic_module_primal(self, mod, args, kwargs):
        values, keys = self._module_params(mod, recurse=True)
        buffers = dict(mod.named_buffers()) if self._update else cloned_buffers(mod)
        out = torch.func.functional_call(mod, (values, buffers), tuple(args), dict(kwargs))
        ctx = (
            {k: v.detach() for k, v in values.items()},
            [a.detach() if isinstance(a, Tensor) else a for a in args],
            kwargs,
            _rng_state(args),
        )
        return out, ctx, keys

    # tangent pass --------------------------------------------------------------------------
    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        tenv: dict[fx.Node, Tangent] = {}
        for node, name in self._getattr_tangent.items():
            tenv[node] = tangents.get(name)

        def tload(a):
            # tangents of graph values; constants (numbers, flags) carry no tangent
            return fx.node.map_aggregate(
                a, lambda n: tenv.get(n) if isinstance(n, fx.Node) else None
            )

        for entry in self._tape:
            node = entry.node
            if entry.kind == "module":
                mod, rule = entry.target
                tx = tenv.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
                tp = {k: (tangents.get(n) if n else None) for k, n in entry.param_keys.items()}
                if tx is None and all(t is None for t in tp.values()):
                    continue
                tenv[node] = rule.tangent(mod, entry.ctx, tx, tp)
            elif entry.kind == "generic_module":
                tenv[node] = self._generic_module_tangent(entry, tload(node.args), tangents)
            else:
                if entry.ctx is None:
                    continue
                targs = tload(node.args)
                tkwargs = tload(node.kwargs)
                if _all_none(targs) and _all_none(tkwargs):
                    continue
                tenv[node] = _function_tangent(entry.target, node, entry.ctx, targs, tkwargs)
        return tenv.get(self._output_node)

    def _generic_module_tangent(self, entry, targs, tangents):
        mod = entry.target
        values, args, kwargs, rng = entry.ctx
        tvals = {
            k: tangents.get(n) for k, n in entry.param_keys.items() if n and n in tangents
        }
        if not tvals and _all_none(targs):
            return None
        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        buffers = cloned_buffers(mod)

        def f(pvals, *targ_values):
            full = list(args)
            for i, v in zip(tensor_pos, targ_values, strict=True):
                full[i] = v
            return torch.func.functional_call(mod, ({**values, **pvals}, buffers), tuple(full),
                                              dict(kwargs))

        primal_p = {k: values[k] for k in tvals}
        primals = (primal_p, *[args[i] for i in tensor_pos])
        tans = (
            tvals,
            *[
                targs[i] if targs[i] is not None else torch.zeros_like(args[i])
                for i in tensor_pos
            ],
        )
        with _replay_rng(rng):
            return torch.func.jvp(f, primals, tans)[1]


def _has_float_tensor(tree) -> bool:
    """Whether ``tree`` holds a floating-point tensor (e.g. not a ``torch.Size``)."""
    if isinstance(tree, Tensor):
        return tree.is_floating_point()
    if isinstance(tree, torch.Size) or not isinstance(tree, tuple | list):
        return False
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return any(isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves)


def _all_none(tree) -> bool:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return all(leaf is None for leaf in leaves)


def _function_tangent(fn, node: fx.Node, ctx, targs, tkwargs) -> Tangent:
    args, kwargs, out = ctx
    name = node.target if node.op == "call_method" else None
    # addition/subtraction: linear in both arguments
    if fn in (operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub) \
            and not kwargs and len(args) == 2:
        ta, tb = targs
        if fn in (operator.sub, torch.sub, operator.isub) and tb is not None:
            tb = -tb
        result = _add(ta, tb)
        if isinstance(result, Tensor) and result.shape != out.shape:
            result = result.expand(out.shape).clone()
        return result
    if fn in (operator.mul, torch.mul) and len(args) == 2 and not kwargs:
        (a, b), (ta, tb) = args, targs
        result = None
        if ta is not None:
            result = ta * b
        if tb is not None:
            result = _add(result, a * tb)
        return result
    if fn in (F.relu, torch.relu) or name == "relu":
        return targs[0] * (out > 0).to(out.dtype)
    if fn is torch.tanh or name == "tanh":
        return targs[0] * (1 - out * out)
    if fn is torch.sigmoid or name == "sigmoid":
        return targs[0] * out * (1 - out)
    first_only = all(t is None for t in targs[1:]) and _all_none(tkwargs)
    if first_only and isinstance(targs[0], Tensor) and (
        fn in _LINEAR_IN_FIRST or name in _LINEAR_METHODS
    ):
        return fn(targs[0], *args[1:], **kwargs)
    if fn is operator.getitem and isinstance(targs[0], tuple | list):
        return targs[0][args[1]]
    return _generic_function_tangent(fn, args, kwargs, targs, tkwargs)


def _generic_function_tangent(fn, args, kwargs, targs, tkwargs) -> Tangent:
    flat_args, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    flat_t, _ = torch.utils._pytree.tree_flatten(
        (targs, tkwargs), is_leaf=lambda x: x is None
    )
    pos = [i for i, a in enumerate(flat_args) if isinstance(a, Tensor) and a.is_floating_point()]

    def f(*values):
        full = list(flat_args)
        for i, v in zip(pos, values, strict=True):
            full[i] = v
        a, k = torch.utils._pytree.tree_unflatten(full, spec)
        return fn(*a, **k)

    primals = tuple(flat_args[i].detach() for i in pos)
    tans = tuple(
        flat_t[i] if flat_t[i] is not None else torch.zeros_like(flat_args[i]) for i in pos
    )
    out = torch.func.jvp(f, primals, tans)[1]
    return out


# ----------------------------------------------------------------------------------------
# RNG replay (dropout inside generic nodes / the functional engine)


def _rng_state(tree: Any) -> tuple:
    devices = sorted(
        {
            leaf.device.index or 0
            for leaf in torch.utils._pytree.tree_flatten(tree)[0]
            if isinstance(leaf, Tensor) and leaf.device.type == "cuda"
        }
    )
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), devices, cuda


class _replay_rng:
    def __init__(self, state: tuple) -> None:
        self.state = state

    def __enter__(self):
        cpu, devices, cuda = self.state
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda, strict=True):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class _FunctionalLinearization(Linearization):
    engine = "functional"

    def __init__(self, model: nn.Module, params: dict[str, Tensor], inputs: Any,
                 update_buffers: bool) -> None:
        names = list(params)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        super().__init__(names, leaves)
        self._model = model
        self._inputs = inputs
        self._primals = {n: p.detach() for n, p in params.items()}
        self._rng = _rng_state(inputs)
        buffers = dict(model.named_buffers()) if update_buffers else cloned_buffers(model)
        self._buffers_for_jvp = cloned_buffers(model)
        with torch.enable_grad():
            self.output = torch.func.functional_call(
                model, (dict(zip(names, leaves, strict=True)), buffers), (inputs,)
            )
        if not isinstance(self.output, Tensor):
            raise TypeError(
                f"linearize: the model must return a single tensor, got "
                f"{type(self.output).__name__}"
            )

    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        if not tangents:
            return None
        primal = {n: self._primals[n] for n in tangents}
        buffers = {
            n: (None if b is None else b.clone()) for n, b in self._buffers_for_jvp.items()
        }

        def f(p):
            return torch.func.functional_call(self._model, ({**self._primals, **p}, buffers),
                                              (self._inputs,))

        with _replay_rng(self._rng):
            return torch.func.jvp(f, (primal,), (dict(tangents),))[1]


def linearize(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    *,
    update_buffers: bool = False,
    engine: str = "auto",
) -> Linearization:
    r"""Run ``model(inputs)`` once and return an object for repeated :math:`Jv` / :math:`J^\top r`.

    Args:
        model: The network. Its output must be a single tensor.
        params: Ordered ``{name: parameter}`` (see :func:`curvlab.func.params.select_params`);
            Jacobians are taken w.r.t. these, all other parameters are constants.
        inputs: Passed as the single positional argument of ``model``.
        update_buffers: Let the forward update buffers (BatchNorm running statistics) exactly as
            ``model(inputs)`` would. ``False`` leaves every buffer untouched.
        engine: ``"auto"``, ``"layerwise"`` or ``"functional"`` (see module docstring).

    Returns:
        A :class:`Linearization` with ``.output``, ``.jvp(v)``, ``.vjp(r)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> params = dict(net.named_parameters())
        >>> lin = linearize(net, params, torch.randn(5, 3))
        >>> lin.engine, lin.output.shape
        ('layerwise', torch.Size([5, 2]))
        >>> v = {n: torch.randn_like(p) for n, p in params.items()}
        >>> lin.jvp(v).shape
        torch.Size([5, 2])
    """
    if engine not in ("auto", "layerwise", "functional"):
        raise ValueError(f"engine must be 'auto', 'layerwise' or 'functional', got {engine!r}")
    params = dict(params)
    # Under autocast, casts of leaf parameters are cached for the life of the autocast
    # context; an optimizer that updated parameters in place inside that context would
    # otherwise see stale low-precision weights. Clearing costs one re-cast per forward.
    torch.clear_autocast_cache()
    if engine in ("auto", "layerwise"):
        gm = _trace(model)
        if gm is not None:
            return _LayerwiseLinearization(gm, params, inputs, update_buffers)
        if engine == "layerwise":
            raise ValueError(
                f"engine='layerwise': torch.fx could not trace {type(model).__name__}; "
                "use engine='functional'"
            )
    return _FunctionalLinearization(model, params, inputs, update_buffers)
