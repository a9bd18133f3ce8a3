"""Tangent rules of the layer-wise engine for traced function and method calls.

Additions, products, activations and shape operations have closed forms; anything else is
differentiated by ``torch.func.jvp`` on that call alone (:func:`generic_function_tangent`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.func.tangent_rules import Tangent, add_tangents

__all__ = [
    "LINEAR_IN_FIRST",
    "LINEAR_METHODS",
    "all_none",
    "float_output_jvp",
    "function_tangent",
    "generic_function_tangent",
    "has_float_tensor",
]

# functions linear in their first argument (other arguments carry no tangent)
LINEAR_IN_FIRST = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, operator.getitem, operator.neg, torch.neg, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.sum, torch.mean,
}
LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
    "sum", "mean", "__getitem__", "neg", "expand", "view_as", "reshape_as", "t", "mT",
}


def has_float_tensor(tree) -> bool:
    """Whether ``tree`` holds a floating-point tensor (e.g. not a ``torch.Size``)."""
    if isinstance(tree, Tensor):
        return tree.is_floating_point()
    if isinstance(tree, torch.Size) or not isinstance(tree, tuple | list):
        return False
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return any(isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves)


def all_none(tree) -> bool:
    """Whether every leaf of ``tree`` is ``None`` (no tangent anywhere)."""
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return all(leaf is None for leaf in leaves)


def function_tangent(fn, node: fx.Node, ctx, targs, tkwargs) -> Tangent:
    """Tangent of a traced ``call_function``/``call_method`` node.

    ``ctx = (args, kwargs, out)`` are the node's primal arguments and output; ``targs`` and
    ``tkwargs`` mirror ``args``/``kwargs`` with tangents (``None`` for no tangent).
    """
    args, kwargs, out = ctx
    name = node.target if node.op == "call_method" else None
    # addition/subtraction: linear in both arguments
    if fn in (operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub) \
            and not kwargs and len(args) == 2:
        ta, tb = targs
        if fn in (operator.sub, torch.sub, operator.isub) and tb is not None:
            tb = -tb
        result = add_tangents(ta, tb)
        if isinstance(result, Tensor) and result.shape != out.shape:
            result = result.expand(out.shape).clone()
        return result
    if fn in (operator.mul, torch.mul) and len(args) == 2 and not kwargs:
        (a, b), (ta, tb) = args, targs
        result = None
        if ta is not None:
            result = ta * b
        if tb is not None:
            result = add_tangents(result, a * tb)
        return result
    if fn in (F.relu, torch.relu) or name == "relu":
        return targs[0] * (out > 0).to(out.dtype)
    if fn is torch.tanh or name == "tanh":
        return targs[0] * (1 - out * out)
    if fn is torch.sigmoid or name == "sigmoid":
        return targs[0] * out * (1 - out)
    first_only = all(t is None for t in targs[1:]) and all_none(tkwargs)
    if first_only and isinstance(targs[0], Tensor) and (
        fn in LINEAR_IN_FIRST or name in LINEAR_METHODS
    ):
        return fn(targs[0], *args[1:], **kwargs)
    if fn is operator.getitem and isinstance(targs[0], tuple | list):
        return targs[0][args[1]]
    return generic_function_tangent(fn, args, kwargs, targs, tkwargs)


def generic_function_tangent(fn, args, kwargs, targs, tkwargs) -> Tangent:
    """``torch.func.jvp`` of ``fn`` alone, tangents on its floating-point tensor arguments.

    Integer and boolean tensors (indices, masks) are constants; non-floating outputs get no
    tangent (``None``).
    """
    flat_args, spec = tree_flatten((args, kwargs))
    flat_t = _flat_tangents((args, kwargs), (targs, tkwargs))
    pos = [i for i, a in enumerate(flat_args) if _is_float(a)]

    def f(*values):
        full = list(flat_args)
        for i, v in zip(pos, values, strict=True):
            full[i] = v
        a, k = tree_unflatten(full, spec)
        return fn(*a, **k)

    primals = tuple(flat_args[i].detach() for i in pos)
    tans = tuple(
        flat_t[i] if flat_t[i] is not None else torch.zeros_like(flat_args[i]) for i in pos
    )
    return float_output_jvp(f, primals, tans)


def float_output_jvp(f: Callable[..., Any], primals: tuple, tangents: tuple) -> Any:
    """``torch.func.jvp(f, primals, tangents)[1]`` for an ``f`` whose output may hold
    non-tensor or non-floating leaves (e.g. ``(attn_output, None)`` or ``(values, indices)``):
    those get ``None``, the output's structure is kept."""
    record: dict[str, Any] = {}

    def float_leaves(*p):
        leaves, out_spec = tree_flatten(f(*p))
        record["mask"] = [_is_float(leaf) for leaf in leaves]
        record["spec"] = out_spec
        return tuple(leaf for leaf in leaves if _is_float(leaf))

    touts = iter(torch.func.jvp(float_leaves, primals, tangents)[1])
    full = [next(touts) if keep else None for keep in record["mask"]]
    return tree_unflatten(full, record["spec"])


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _flat_tangents(arg: Any, targ: Any) -> list:
    """Tangents aligned with ``tree_flatten(arg)``; a ``None`` tangent of a container stands
    for ``None`` at each of its leaves."""
    if targ is None:
        return [None] * len(tree_flatten(arg)[0])
    if isinstance(arg, tuple | list) and isinstance(targ, tuple | list) and len(arg) == len(targ):
        return [t for a, ta in zip(arg, targ, strict=True) for t in _flat_tangents(a, ta)]
    if isinstance(arg, Mapping) and isinstance(targ, Mapping):
        return [t for k in arg for t in _flat_tangents(arg[k], targ.get(k))]
    return [targ]
