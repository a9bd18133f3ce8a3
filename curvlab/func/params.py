"""Selecting, validating and (un)flattening the parameters a curvature object acts on.

Conventions used everywhere in curvlab:

* The *parameter set* is an ordered ``dict[str, Tensor]`` mapping the model's qualified
  parameter names (as in ``model.named_parameters()``) to the model's own tensors.
* The default set is every parameter with ``requires_grad=True``, in ``model.parameters()``
  order. A user-given list/tuple/dict keeps the user's order.
* *Flat order*: the tensors of the parameter set in that order, each flattened row-major
  (``tensor.reshape(-1)``), concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

ParamsArg = None | Mapping[str, Tensor] | Sequence[Tensor | str]


def select_params(model: nn.Module, params: ParamsArg = None) -> dict[str, Tensor]:
    """Resolve a ``params`` argument into an ordered ``{name: parameter}`` dict.

    Args:
        model: The model whose parameters are selected.
        params: ``None`` for all trainable parameters (``requires_grad=True``) in
            ``model.parameters()`` order; a list/tuple of the model's parameter tensors or of
            their names; or a dict ``{name: tensor}`` whose values are the model's parameters
            of those names.

    Returns:
        Ordered dict from qualified parameter name to the model's parameter tensor.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``params`` has an unsupported type, or a
            selected parameter is not floating point.
        ValueError: on unknown names, tensors that are not parameters of ``model``, duplicates,
            or an empty selection.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> list(select_params(net))
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> list(select_params(net, ["2.weight"]))
        ['2.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError(
                f"model {type(model).__name__} has no parameters with requires_grad=True; "
                "pass params= explicitly"
            )
    elif isinstance(params, Mapping):
        selected = {}
        for name, tensor in params.items():
            if not isinstance(name, str):
                raise TypeError(f"params dict keys must be parameter names (str), got {name!r}")
            if name not in named:
                raise ValueError(
                    f"params: unknown parameter name {name!r}; the model has {sorted(named)}"
                )
            if tensor is not named[name]:
                raise ValueError(
                    f"params[{name!r}] is not the model's parameter of that name; pass the "
                    "model's own tensors (curvature is evaluated at the model's current values)"
                )
            selected[name] = tensor
    elif isinstance(params, Sequence) and not isinstance(params, str | bytes):
        selected = {}
        for i, item in enumerate(params):
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(
                        f"params[{i}]: unknown parameter name {item!r}; "
                        f"the model has {sorted(named)}"
                    )
                name = item
            elif isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError(
                        f"params[{i}] (shape {tuple(item.shape)}) is not a parameter of the model"
                    )
                name = by_id[id(item)]
            else:
                raise TypeError(
                    f"params[{i}] must be a parameter tensor or name, got {type(item).__name__}"
                )
            if name in selected:
                raise ValueError(f"params: parameter {name!r} is listed twice")
            selected[name] = named[name]
    else:
        raise TypeError(
            "params must be None, a list/tuple of parameters or names, or a dict "
            f"{{name: parameter}}; got {type(params).__name__}"
        )
    if not selected:
        raise ValueError("params selects no parameters")
    for name, p in selected.items():
        if not p.is_floating_point():
            raise TypeError(
                f"parameter {name!r} has dtype {p.dtype}; curvature needs floating-point parameters"
            )
    return selected


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (row-major per tensor).

    Example:
        >>> flatten([torch.ones(2, 2), torch.zeros(1)]).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[Tensor]:
    """Split a flat vector (or a ``(P, K)`` matrix, column-wise) into tensors of ``shapes``.

    A trailing column dimension is kept: ``(P, K)`` gives tensors of shape ``(*shape, K)``.

    Example:
        >>> [t.shape for t in unflatten(torch.arange(5.0), [(2, 2), (1,)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if flat.shape[0] != sum(sizes):
        raise ValueError(f"flat vector has length {flat.shape[0]}, expected {sum(sizes)}")
    trailing = tuple(flat.shape[1:])
    return [
        chunk.reshape(*s, *trailing)
        for chunk, s in zip(torch.split(flat, sizes), shapes, strict=True)
    ]


def cloned_buffers(model: nn.Module) -> dict[str, Tensor | None]:
    """Buffers for a side-effect-free ``functional_call`` of ``model``.

    Every buffer is cloned, so a functional call never changes the model's own buffers. For
    BatchNorm layers in training mode the running statistics are replaced by ``None``: the layer
    then normalizes with batch statistics (what it does in training anyway) and skips the
    in-place running-average update, which ``torch.func`` transforms cannot trace.
    """
    skip: set[str] = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            dot = f"{prefix}." if prefix else ""
            skip.update(f"{dot}{b}" for b in ("running_mean", "running_var", "num_batches_tracked"))
    return {n: (None if n in skip else b.clone()) for n, b in model.named_buffers()}


def batch_size_of(inputs: object) -> int:
    """Number of examples in ``inputs``: the leading dimension of its first tensor leaf.

    Example:
        >>> batch_size_of(torch.zeros(5, 3))
        5
        >>> batch_size_of({"x": torch.zeros(4, 2)})
        4
    """
    leaves, _ = torch.utils._pytree.tree_flatten(inputs)
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if leaf.dim() == 0:
                raise ValueError("inputs: cannot infer the batch size of a 0-dimensional tensor")
            return int(leaf.shape[0])
    raise TypeError(f"inputs must contain at least one tensor, got {type(inputs).__name__}")
