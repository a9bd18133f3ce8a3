r"""Common machinery of the data-set curvature operators (Hessian, GGN, Fisher, empirical Fisher).

A :class:`CurvatureOperator` is the ``P x P`` curvature matrix of the loss of ``model`` over a
whole data set, w.r.t. a set of parameters, available only through products ``op @ v``.

Data. ``data`` is one batch ``(inputs, targets)`` or a *re-iterable* of such batches (a list,
a ``torch.utils.data.DataLoader``, ...). The operator iterates ``data`` once per product, so a
one-shot iterator or generator is rejected with ``TypeError`` (wrap it in ``list(...)``). Tensors
in a batch are moved to the operator's device (the device of the parameters); batches must come
in the same order each pass for a fixed-seed Monte-Carlo Fisher to be deterministic.

Aggregation over batches follows the loss's reduction, so the operator equals the curvature of
one concatenated batch:

* ``reduction='sum'``: curvatures of the batches add.
* ``reduction='mean'``: batch ``b`` is weighted by its number of *loss terms* ``T_b`` over the
  total, :math:`C = \sum_b (T_b / \sum_{b'} T_{b'})\, C_b` with ``T_b`` the count the loss
  divides by (examples for ``(N, C)`` cross-entropy, examples x positions for ``(N, C, d...)``,
  output elements for MSE and BCE-with-logits; see :mod:`curvlab.func.losses`). The empirical
  Fisher, defined through per-example gradients, weights batches by their number of examples:
  :math:`\frac1N \sum_n g_n g_n^\top`.
* A custom loss callable (no ``reduction`` attribute) is treated as a mean over examples.

Flat order: the selected parameters in ``model.parameters()`` order (or the order of a
user-given ``params`` list/dict), each flattened row-major (see :mod:`curvlab.operators.base`).

Side effects: none. Products run on detached copies of the parameters with cloned buffers
(BatchNorm in train mode uses batch statistics and does not update running statistics), and
never touch ``.grad``. A model in train mode with dropout gives a different (random) operator
at every product; call ``model.eval()`` for a fixed operator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.linearize import linearize
from curvlab.func.losses import LossFn, LossRule, loss_rule
from curvlab.func.params import ParamsArg, batch_size_of, cloned_buffers, select_params
from curvlab.operators.base import LinearOperator, unflatten

__all__ = ["CurvatureOperator", "as_batches", "stack_columns"]

Batch = tuple[Any, Any]


def as_batches(data: Any) -> Iterable[Batch]:
    """Normalize ``data`` to a re-iterable of ``(inputs, targets)`` batches.

    Args:
        data: One batch ``(inputs, targets)`` (a 2-tuple/list whose second entry is a tensor) or
            a re-iterable of batches (list, tuple, ``DataLoader``).

    Returns:
        A list holding the single batch, or ``data`` itself.

    Raises:
        TypeError: for a one-shot iterator/generator or a non-iterable.

    Example:
        >>> x, y = torch.zeros(3, 2), torch.zeros(3)
        >>> len(as_batches((x, y))), len(as_batches([(x, y), (x, y)]))
        (1, 2)
    """
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], Tensor):
        return [tuple(data)]
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}); a curvature operator "
            "iterates its data once per product, so pass a re-iterable (a list of batches, a "
            "DataLoader), e.g. data=list(your_generator)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be one (inputs, targets) batch or a re-iterable of such batches, got "
            f"{type(data).__name__}"
        )
    return data


def _to_device(tree: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device) if isinstance(t, Tensor) and t.device != device else t, tree
    )


class CurvatureOperator(LinearOperator):
    """Base class of data-set curvature operators (see the module docstring).

    Subclasses implement :meth:`_batch_products`, the *unnormalized* curvature product of one
    batch for a list of tangents, and may set :attr:`_weight_by_examples`.

    Args:
        model: The network; its output must be a single tensor the loss accepts.
        loss_fn: ``loss_fn(output, targets) -> scalar``; ``nn.CrossEntropyLoss``, ``nn.MSELoss``
            and ``nn.BCEWithLogitsLoss`` get closed-form output-space rules.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches.
        params: ``None`` (all parameters with ``requires_grad=True``), a list of parameters or
            names, or a ``{name: parameter}`` dict.

    Raises:
        TypeError: for a non-module model, a one-shot data iterator, non-floating parameters,
            mixed parameter dtypes/devices, a malformed batch.
        ValueError: for unknown parameter names, ``reduction='none'``, empty data, or a model
            output the loss cannot take (both shapes named).

    Example:
        >>> from curvlab.operators import GGN
        >>> net = torch.nn.Linear(2, 1)
        >>> batches = [(torch.randn(n, 2), torch.randn(n, 1)) for n in (3, 5)]
        >>> G = GGN(net, torch.nn.MSELoss(), batches)     # 'mean' over all 8 examples
        >>> isinstance(G, CurvatureOperator), G.shape
        (True, (3, 3))
    """

    #: Weight 'mean' batches by examples (True) instead of loss terms (False).
    _weight_by_examples = False

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: Any, params: ParamsArg = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        selected = select_params(model, params)
        rule = loss_rule(loss_fn)
        first = next(iter(selected.values()))
        for name, p in selected.items():
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(
                    f"parameter {name!r} is {p.dtype} on {p.device} but "
                    f"{next(iter(selected))!r} is {first.dtype} on {first.device}; a curvature "
                    "operator needs one dtype and device for all selected parameters"
                )
        batches = as_batches(data)
        self.model = model
        self.loss_fn = loss_fn
        self.rule: LossRule = rule
        self.data = batches
        self._params = selected
        self._names = list(selected)
        super().__init__(
            (sum(p.numel() for p in selected.values()),) * 2,
            first.dtype,
            first.device,
            param_shapes=[p.shape for p in selected.values()],
            param_names=self._names,
            symmetric=True,
        )
        self._check_first_batch()

    # ------------------------------------------------------------------ data

    def _check_batch(self, batch: Any, index: int) -> Batch:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(
                f"data batch {index} must be an (inputs, targets) pair, got "
                f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                             if isinstance(batch, tuple | list) else "")
            )
        inputs, targets = batch
        return _to_device(inputs, self.device), _to_device(targets, self.device)

    def batches(self) -> Iterator[Batch]:
        """Iterate over the data once, yielding validated ``(inputs, targets)`` on the device."""
        for i, batch in enumerate(self.data):
            yield self._check_batch(batch, i)

    def _check_first_batch(self) -> None:
        iterator = iter(self.data)
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(
                "data is empty: a curvature operator needs at least one (inputs, targets) batch"
            ) from None
        inputs, targets = self._check_batch(batch, 0)
        with torch.no_grad():
            out = torch.func.functional_call(
                self.model,
                ({n: p.detach() for n, p in self._params.items()}, cloned_buffers(self.model)),
                (inputs,),
            )
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{type(self.model).__name__} must return a single tensor, got "
                f"{type(out).__name__}"
            )
        try:
            self.rule.check(out, targets)
            if type(self.rule).check is LossRule.check:  # no closed-form check: try the loss
                self.loss_fn(out, targets)
        except (ValueError, RuntimeError, IndexError) as err:
            raise ValueError(
                f"{type(self.model).__name__} output of shape {tuple(out.shape)} does not fit "
                f"{self.rule.name} with targets of shape {tuple(targets.shape)} "
                f"(first batch): {err}"
            ) from err
        out_dtype = out.dtype
        if not out_dtype.is_floating_point:
            raise TypeError(f"model output has dtype {out_dtype}, expected floating point")

    def _units(self, output: Tensor, inputs: Any, targets: Any = None) -> int | float:
        """Weight of a batch under 'mean' reduction (see the module docstring): the loss terms
        the reduction divides by (for cross-entropy with ``ignore_index`` or class weights,
        the non-ignored targets or their total weight)."""
        if self._weight_by_examples or self.rule.reduction not in ("mean", "sum"):
            return batch_size_of(inputs)
        return self.rule.num_loss_terms(output, targets)

    # ------------------------------------------------------------------ products

    def _batch_products(self, inputs: Any, targets: Any, vs: list[list[Tensor]]) -> tuple:
        """Return ``(products, output)`` for one batch.

        ``vs`` holds ``K`` tangents, each a list of parameter-shaped tensors; ``products`` is a
        ``(P, K)`` tensor of the batch curvature (with the loss's own reduction on this batch)
        times each tangent, ``output`` the model output on the batch (for the weights).
        """
        raise NotImplementedError

    def _matmat(self, M: Tensor) -> Tensor:
        cols = unflatten(M, self.param_shapes)  # each (*shape, K)
        k = M.shape[1]
        vs = [[c[..., j] for c in cols] for j in range(k)]
        total: Tensor | None = None
        first_units = units = 0
        mean = self.rule.reduction != "sum"
        self._begin_product()
        for inputs, targets in self.batches():
            prod, output = self._batch_products(inputs, targets, vs)
            u = self._units(output, inputs, targets) if mean else 1
            if total is None:
                total, first_units = prod, u
            else:
                if first_units != 1:  # fold the first batch's weight in lazily
                    total.mul_(first_units)
                    first_units = 1
                total.add_(prod, alpha=u)
            units += u
        if total is None:
            raise ValueError("data became empty: the data iterable yielded no batch")
        if mean and units != first_units:  # a single batch needs no rescaling
            total.mul_(first_units / units)
        return total

    def _begin_product(self) -> None:
        """Hook called before each product's data pass (e.g. to reseed a sampler)."""

    #: Columns per vectorized (``vmap``) tangent/backward pass in a matrix product.
    vectorize_chunk = 16

    def _linearized_products(
        self,
        inputs: Any,
        targets: Any,
        vs: list[list[Tensor]],
        output_space: Any,
        prepare: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """``J^T (output_space(output, J v))`` for each tangent, with one forward per batch.

        The model is linearized once (:func:`curvlab.func.linearize`). Columns are pushed
        through in chunks of :attr:`vectorize_chunk` with ``vmap``-ed tangent passes and one
        batched backward (``is_grads_batched``); if a layer does not support ``vmap`` the
        operator falls back to one tangent pass and one backward per column (same result).
        ``prepare(output)``, if given, runs once before any column (e.g. to draw MC samples).
        """
        lin = linearize(self.model, self._params, inputs)
        output = lin.output.detach()
        if prepare is not None:
            prepare(output)
        k = len(vs)
        parts: list[Tensor] = []
        start = 0
        if k > 1 and getattr(self, "_vmap_ok", True):
            try:
                while start < k:
                    chunk = vs[start:start + self.vectorize_chunk]
                    tangents = [torch.stack([v[i] for v in chunk]) for i in range(len(chunk[0]))]
                    u = lin.jvp_batched(tangents)
                    r = torch.func.vmap(lambda ui: output_space(output, ui))(u)
                    grads = lin.vjp_batched(r, retain_graph=True)
                    parts.append(torch.cat([g.reshape(len(chunk), -1) for g in grads], 1).T)
                    start += len(chunk)
            except (RuntimeError, NotImplementedError, ValueError):
                self._vmap_ok = False  # e.g. a generic layer draws random numbers under vmap
        cols = []
        for j in range(start, k):
            u = lin.jvp(vs[j])
            r = output_space(output, u)
            cols.append(lin.vjp(r, retain_graph=j < k - 1))
        if cols:
            parts.append(stack_columns(cols))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), output

    # ------------------------------------------------------------------ helpers

    def _primal_params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self._params.items()}

    def _repr_extra(self) -> str:
        return f"loss={self.rule!r}"


def stack_columns(products: Sequence[Sequence[Tensor]]) -> Tensor:
    """``(P, K)`` matrix from ``K`` parameter-form products, one copy (internal helper)."""
    first = products[0]
    p = sum(t.numel() for t in first)
    out = torch.empty(p, len(products), dtype=first[0].dtype, device=first[0].device)
    for j, prod in enumerate(products):
        offset = 0
        for t in prod:
            n = t.numel()
            out[offset:offset + n, j] = t.reshape(-1)
            offset += n
    return out


def tangent_dict(names: list[str], v: Sequence[Tensor]) -> Mapping[str, Tensor]:
    """``{name: tangent}`` for a parameter-form list (internal helper)."""
    return dict(zip(names, v, strict=True))
