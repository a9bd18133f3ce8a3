r"""Matrix-free curvature-vector products on one batch (pure functions).

All functions take parameter-shaped tangents ``v`` (a dict keyed like ``params`` or a list in
its order) and return the product in the same form. Curvatures are those of the batch loss
``loss_fn(model(inputs), targets)`` with the loss's own reduction (see
:mod:`curvlab.func.losses` for the scaling convention). Nothing the model owns (parameters,
BatchNorm running statistics, ``.grad``) is modified.

* :func:`hvp` — Hessian of any scalar function of parameters, forward-over-reverse
  (``jvp`` of ``grad``).
* :func:`hessian_vector_product` — Hessian of the batch loss w.r.t. model parameters, by
  ``torch.autograd.forward_ad`` dual parameters through one ordinary backward;
  :func:`hessian_vector_products` does several tangents (RNG replayed, same dropout mask).
* :func:`ggn_vector_product` (alias :func:`ggnvp`) — :math:`J^\top H_L J v`: one forward
  carrying the tangent, the closed-form loss Hessian, one backward.
* :func:`fisher_vector_product` — Monte-Carlo Fisher :math:`J^\top \hat F_L J v` with targets
  sampled from the model (``mc_samples``, ``generator``).
* :func:`empirical_fisher_vector_product` — :math:`w \sum_n g_n g_n^\top v` with ``g_n`` the
  gradient of example ``n``'s own loss and ``w = 1/N`` ('mean') or ``1`` ('sum').
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn

from curvlab.func.forward_ad import forward_ad_kernels
from curvlab.func.linearize import Linearization, linearize
from curvlab.func.losses import LossFn, LossRule, loss_rule
from curvlab.func.params import ParamsArg, cloned_buffers, select_params
from curvlab.func.rng import replay_rng, rng_state, tensor_leaves

Tangents = Mapping[str, Tensor] | Sequence[Tensor]

__all__ = [
    "empirical_fisher_vector_product",
    "fisher_vector_product",
    "ggn_vector_product",
    "ggnvp",
    "hessian_vector_product",
    "hessian_vector_products",
    "hvp",
]


def hvp(loss_of_params: Callable[[Any], Tensor], params: Any, v: Any) -> Any:
    r"""Hessian-vector product :math:`\nabla^2 f(\theta)\, v` by forward-over-reverse.

    Args:
        loss_of_params: Scalar function of ``params`` (any pytree of tensors).
        params: Point of evaluation.
        v: Tangent with the structure of ``params``.

    Returns:
        :math:`H v`, structured like ``params``.

    Example:
        >>> f = lambda x: (x ** 3).sum()
        >>> hvp(f, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """
    return torch.func.jvp(torch.func.grad(loss_of_params), (params,), (v,))[1]


def _prepare(model: nn.Module, params: ParamsArg, v: Tangents) -> tuple[dict, list, bool]:
    selected = select_params(model, params)
    names = list(selected)
    if isinstance(v, Mapping):
        if set(v) != set(names):
            missing, unknown = set(names) - set(v), set(v) - set(names)
            raise ValueError(
                f"v: keys must match the parameters; missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        vs = [v[n] for n in names]
        as_dict = True
    elif isinstance(v, Sequence) and not isinstance(v, Tensor):
        vs = list(v)
        if len(vs) != len(names):
            raise ValueError(f"v: got {len(vs)} tensors, expected {len(names)} ({names})")
        as_dict = False
    else:
        raise TypeError(
            "v must be a dict {name: tensor} or a list of parameter-shaped tensors, got "
            f"{type(v).__name__}; use the curvlab operators for flat vectors"
        )
    for n, t in zip(names, vs, strict=True):
        p = selected[n]
        if not isinstance(t, Tensor):
            raise TypeError(f"v[{n!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"v[{n!r}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(
                f"v[{n!r}] is {t.dtype} on {t.device}, the parameter is {p.dtype} on {p.device}"
            )
    return selected, vs, as_dict


def _pack(names: list[str], values: list[Tensor], as_dict: bool):
    return dict(zip(names, values, strict=True)) if as_dict else values


def _output_product(
    model: nn.Module,
    loss_fn: LossFn,
    params: ParamsArg,
    inputs: Any,
    targets: Tensor | None,
    v: Tangents,
    output_space: Callable[[LossRule, Linearization, Tensor], Tensor],
):
    selected, vs, as_dict = _prepare(model, params, v)
    rule = loss_rule(loss_fn)
    lin = linearize(model, selected, inputs)
    if targets is not None:
        rule.check(lin.output, targets)
    u = lin.jvp(vs)
    r = output_space(rule, lin, u)
    return _pack(list(selected), lin.vjp(r, retain_graph=False), as_dict)


def ggn_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    params: ParamsArg,
    inputs: Any,
    targets: Tensor,
    v: Tangents,
):
    r"""Generalized Gauss-Newton product :math:`G v = J^\top H_L J v` on one batch.

    ``J`` is the Jacobian of ``model(inputs)`` w.r.t. the selected parameters and ``H_L`` the
    Hessian of ``loss_fn`` w.r.t. the model output (closed form for cross-entropy, MSE and
    BCE-with-logits; autodiff otherwise).

    Args:
        model: The network (its parameters and buffers are not modified).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        params: ``None`` (all trainable), a list of parameters/names, or a dict.
        inputs: Model input for this batch.
        targets: Targets for this batch.
        v: Tangent, dict keyed by parameter name or list in parameter order.

    Returns:
        :math:`Gv` in the form of ``v``.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
        >>> v = [torch.ones(2, 3), torch.zeros(2)]
        >>> [t.shape for t in ggnvp(net, torch.nn.MSELoss(), None, x, y, v)]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    return _output_product(
        model, loss_fn, params, inputs, targets, v,
        lambda rule, lin, u: rule.hessian_vp(lin.output.detach(), targets, u),
    )


ggnvp = ggn_vector_product


def fisher_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    params: ParamsArg,
    inputs: Any,
    v: Tangents,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
):
    r"""Monte-Carlo Fisher product :math:`J^\top \big(\tfrac1S\sum_s s_s s_s^\top\big) J v`.

    ``s_s`` are loss gradients at targets sampled from the model's predictive distribution
    (see :meth:`curvlab.func.losses.LossRule.sample_grads`); the estimator is unbiased for the
    GGN of the same loss, and its scale follows the loss's reduction. ``targets`` (optional) are
    the data's targets: cross-entropy uses them for its class weights and ``ignore_index``
    (ignored positions get no sample; the 'mean' divides by the non-ignored count); without
    them every position counts.

    Example:
        >>> net = torch.nn.Linear(3, 4)
        >>> g = torch.Generator().manual_seed(0)
        >>> out = fisher_vector_product(net, torch.nn.CrossEntropyLoss(), None, torch.randn(8, 3),
        ...                             [torch.ones(4, 3), torch.ones(4)], generator=g)
        >>> [t.shape for t in out]
        [torch.Size([4, 3]), torch.Size([4])]
    """
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    return _output_product(
        model, loss_fn, params, inputs, targets, v,
        lambda rule, lin, u: rule.mc_fisher_vp(lin.output.detach(), u, mc_samples, generator,
                                               target=targets),
    )


def empirical_fisher_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    params: ParamsArg,
    inputs: Any,
    targets: Tensor,
    v: Tangents,
):
    r"""Empirical Fisher product :math:`w\sum_n g_n g_n^\top v` on one batch.

    ``g_n`` is the gradient of example ``n``'s own loss (``loss_fn`` on that example alone, same
    reduction) and ``w = 1/N`` for ``reduction='mean'``, ``1`` for ``'sum'``. Computed without
    materializing per-example gradients: ``g_n^T v = <∇ℓ_n, (J v)_n>`` in output space, then one
    backward (identical to ``vmap``-ed per-example gradients, see the tests).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(3, 2), torch.randn(3, 1)
        >>> [t.shape for t in empirical_fisher_vector_product(
        ...     net, torch.nn.MSELoss(), None, x, y, [torch.ones(1, 2), torch.ones(1)])]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    return _output_product(
        model, loss_fn, params, inputs, targets, v,
        lambda rule, lin, u: rule.empirical_fisher_vp(lin.output.detach(), targets, u),
    )


def hessian_vector_products(
    model: nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    vs: Sequence[Sequence[Tensor]],
    *,
    rule: LossRule | None = None,
) -> list[list[Tensor]]:
    r"""Hessian of the batch loss times each of several tangents (forward-over-reverse).

    For each tangent ``v`` (a list in the order of ``params``) the parameters become
    ``torch.autograd.forward_ad`` dual tensors :math:`(\theta, v)`; one forward and one ordinary
    ``torch.autograd.grad`` of the loss (no ``create_graph``) then carry :math:`Hv` as the
    tangent of the gradient. The RNG state is replayed for every tangent, so dropout draws the
    same mask for all of them. Buffers are cloned (no side effects).

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        params: Ordered ``{name: parameter}`` (e.g. from :func:`select_params`).
        inputs: Model input.
        targets: Targets.
        vs: ``K`` tangents, each a list of parameter-shaped tensors.
        rule: Optional loss rule whose ``check(output, targets)`` validates the first output.

    Returns:
        ``K`` products, each a list of parameter-shaped tensors.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(3, 2), torch.randn(3, 1)
        >>> out = hessian_vector_products(net, torch.nn.MSELoss(), dict(net.named_parameters()),
        ...                               x, y, [[torch.ones(1, 2), torch.ones(1)]])
        >>> [t.shape for t in out[0]]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    names = list(params)
    leaves = [p.detach().requires_grad_(True) for p in params.values()]
    rng = rng_state(tensor_leaves(inputs))
    results: list[list[Tensor]] = []
    for v in vs:
        buffers = cloned_buffers(model)
        try:
            with replay_rng(rng), forward_ad_kernels(), torch.enable_grad(), fwad.dual_level():
                duals = {
                    n: fwad.make_dual(leaf, t.to(leaf.dtype))
                    for n, leaf, t in zip(names, leaves, v, strict=True)
                }
                # floating targets get an explicit zero tangent: some loss backward formulas
                # (mse_loss in torch 2.x) write into an implicit zero tangent and fail
                dual_targets = torch.utils._pytree.tree_map(
                    lambda t: fwad.make_dual(t, torch.zeros_like(t))
                    if isinstance(t, Tensor) and t.is_floating_point() else t,
                    targets,
                )
                out = torch.func.functional_call(model, (duals, buffers), (inputs,))
                if rule is not None and not results:
                    rule.check(out, targets)
                loss = loss_fn(out, dual_targets)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                prod = []
                for g, leaf in zip(grads, leaves, strict=True):
                    tangent = None if g is None else fwad.unpack_dual(g).tangent
                    prod.append(torch.zeros_like(leaf) if tangent is None else tangent.detach())
        except (RuntimeError, NotImplementedError) as err:
            if "forward" not in str(err).lower() and "ZeroTensor" not in str(err):
                raise
            prod = _functorch_hvp(model, loss_fn, names, leaves, inputs, targets, v, rng)
        results.append(prod)
    return results


def _functorch_hvp(model, loss_fn, names, leaves, inputs, targets, v, rng) -> list[Tensor]:
    """``torch.func.jvp(torch.func.grad(loss))``: fallback when forward-mode AD through the
    ordinary backward is not available for an operation."""
    buffers = cloned_buffers(model)

    def loss_of_params(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(torch.func.functional_call(model, (p, buffers), (inputs,)), targets)

    primals = {n: leaf.detach() for n, leaf in zip(names, leaves, strict=True)}
    with replay_rng(rng), forward_ad_kernels(), torch.enable_grad():
        out = hvp(loss_of_params, primals, dict(zip(names, v, strict=True)))
    return [out[n] for n in names]


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    params: ParamsArg,
    inputs: Any,
    targets: Tensor,
    v: Tangents,
):
    r"""Hessian of the batch loss w.r.t. the selected parameters, times ``v``.

    Forward-over-reverse (see :func:`hessian_vector_products`): parameters carry ``v`` as
    forward-mode tangents through one forward and one ordinary backward of the loss.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(3, 2), torch.randn(3, 1)
        >>> [t.shape for t in hessian_vector_product(
        ...     net, torch.nn.MSELoss(), None, x, y, [torch.ones(1, 2), torch.ones(1)])]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    selected, vs, as_dict = _prepare(model, params, v)
    names = list(selected)
    (result,) = hessian_vector_products(
        model, loss_fn, selected, inputs, targets, [vs], rule=loss_rule(loss_fn)
    )
    return _pack(names, result, as_dict)
