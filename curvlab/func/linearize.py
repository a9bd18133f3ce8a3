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
    cover ``Linear``, ``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d`` (train and eval), ``Embedding``,
    ``LayerNorm``, ``ReLU``, ``LeakyReLU``, ``GELU``, ``Tanh``, ``Sigmoid``, ``Dropout``, max/avg
    pooling, ``Flatten``, ``Identity``, additions and shape operations. Any other module or
    function (e.g. ``MultiheadAttention``) is handled by ``torch.func.jvp`` on that node alone
    (correct, costs one extra forward of that node).
``"functional"``
    Fallback for models ``torch.fx`` cannot trace (data-dependent control flow): each tangent is
    ``torch.func.jvp`` of the whole model (one extra forward per product), the RNG state replayed
    so dropout masks match.

``"auto"`` (default) uses ``"layerwise"`` when tracing succeeds.

Inputs may hold integer or boolean tensors (token ids, masks): tangents exist only for
floating-point tensors, everything else is a constant of the linearization. Tangent passes run
attention on its "math" kernel, the one with a forward-mode derivative
(:mod:`curvlab.func.forward_ad`).

Buffers: with ``update_buffers=False`` (the default, used by every curvature operator) nothing
the model owns is modified: BatchNorm in train mode normalizes with batch statistics without
touching ``running_mean``/``running_var``. Optimizers pass ``update_buffers=True`` so the one
forward of a training step updates running statistics exactly once, like ``model(x)`` would.

Modules: :mod:`curvlab.func.tangent_rules` (per-module tangent rules, one table),
:mod:`curvlab.func.function_rules` (traced functions), :mod:`curvlab.func.layerwise_engine`,
:mod:`curvlab.func.functional_engine`, :mod:`curvlab.func.linearization` (the shared interface).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.functional_engine import FunctionalLinearization
from curvlab.func.layerwise_engine import LayerwiseLinearization, trace
from curvlab.func.linearization import Linearization

__all__ = ["Linearization", "linearize"]


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
        gm = trace(model)
        if gm is not None:
            return LayerwiseLinearization(gm, params, inputs, update_buffers)
        if engine == "layerwise":
            raise ValueError(
                f"engine='layerwise': torch.fx could not trace {type(model).__name__}; "
                "use engine='functional'"
            )
    return FunctionalLinearization(model, params, inputs, update_buffers)
