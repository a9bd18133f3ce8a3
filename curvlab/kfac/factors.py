r"""Kronecker factors of K-FAC / KFC in the per-example-expectation convention.

For a registered layer with expanded inputs :math:`\bar a_{n,t}` (ones column appended when the
bias is registered; ``t`` runs over the ``T`` locations, ``T = 1`` for a plain Linear layer) and
back-propagated output gradients :math:`\delta_{k,n,t}` of backward pass ``k``:

.. math::

    A = \frac1N \sum_{n,t} \bar a_{n,t}\bar a_{n,t}^\top, \qquad
    G = \frac{s}{T} \sum_k \sum_{n,t} \delta_{k,n,t}\delta_{k,n,t}^\top

with the *Fisher scale* ``s``:

* ``fisher="type2"`` (KFLR): the backward passes propagate the ``K`` columns of the loss-Hessian
  square root (``rule.sqrt_hessian``), ``s = 1``;
* ``fisher="mc"``: they propagate ``mc_samples`` gradients at targets sampled from the model
  (``rule.sample_grads``), ``s = 1/mc_samples``;
* ``fisher="empirical"``: one pass propagates the gradient of the actual batch loss,
  ``s = N`` for ``reduction='mean'`` (the pass carries per-example gradients divided by ``N``),
  ``s = 1`` for ``'sum'``.

Scale. Both choices are made so that ``A ⊗ G`` (column-major vec; **G ⊗ A** in curvlab's
row-major order of ``[W | b]``) approximates the layer's block of ``curvlab.GGN`` (or
``Fisher``/``EmpiricalFisher``) on the same data *at the same scale*, the loss's reduction
included. For ``reduction='mean'`` cross-entropy, ``G`` is exactly the mean over examples of the
per-example outer products (the convention of the papers, TF-KFAC and kfac-jax); for ``'sum'`` it
is ``N`` times that; for ``'mean'`` MSE it includes MSE's ``1/(N·D)``. The approximation is exact
when each example's ``G`` contribution is the same (deep linear networks with MSE), for a single
example, and for ``T = 1``. For convolutions it is KFC's ``Ω̂ ⊗ Γ̂`` (Grosse & Martens 2016:
sums over locations in ``A``, mean over locations in ``G``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.func.losses import LossFn, LossRule, loss_rule
from curvlab.func.params import batch_size_of, cloned_buffers
from curvlab.kfac.capture import FactorCapture
from curvlab.kfac.layers import KFACLayer, LayerTable
from curvlab.kfac.split import SplitMatrix

__all__ = [
    "FisherType",
    "KroneckerFactors",
    "accumulate_factors",
    "capture_statistics",
    "cross_input_factor",
    "cross_output_factor",
    "fisher_scale",
    "input_factor",
    "kfac_factors",
    "output_factor",
    "reduce_shared",
]

FisherType = Literal["type2", "mc", "empirical"]
_FISHER_TYPES = ("type2", "mc", "empirical")


@dataclass
class KroneckerFactors:
    """Kronecker factors of one layer: block ≈ ``G ⊗ A`` in curvlab (row-major) order.

    Attributes:
        A: ``(in_dim, in_dim)`` input factor (ones column last when the bias is registered).
        G: ``(out_dim, out_dim)`` output factor.
        num_examples: Number of examples the factors were estimated from.

    Example:
        >>> f = KroneckerFactors(torch.eye(3), 2 * torch.eye(2), num_examples=4)
        >>> f.A.shape, f.G.shape, f.num_examples
        (torch.Size([3, 3]), torch.Size([2, 2]), 4)
    """

    A: Tensor
    G: Tensor
    num_examples: int

    def block(self) -> Tensor:
        """Dense ``G ⊗ A`` acting on the row-major vec of ``[W | b]`` (small layers only).

        Example:
            >>> KroneckerFactors(torch.eye(2), torch.ones(1, 1), 1).block()
            tensor([[1., 0.],
                    [0., 1.]])
        """
        a = self.A.dense() if isinstance(self.A, SplitMatrix) else self.A
        return torch.kron(self.G, a)


def fisher_scale(fisher: str, num_examples: int, reduction: str, mc_samples: int = 1) -> float:
    """The scale ``s`` of ``G`` for the given Fisher type (see the module docstring).

    Example:
        >>> fisher_scale("empirical", 8, "mean"), fisher_scale("mc", 8, "mean", mc_samples=4)
        (8.0, 0.25)
    """
    if fisher == "type2":
        return 1.0
    if fisher == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        return 1.0 / mc_samples
    if fisher == "empirical":
        if reduction == "mean":
            return float(num_examples)
        if reduction == "sum":
            return 1.0
        raise ValueError(
            f"empirical Fisher needs reduction 'mean' or 'sum', got {reduction!r}; pass an "
            "nn.Module loss with a reduction attribute"
        )
    raise ValueError(f"fisher must be one of {_FISHER_TYPES}, got {fisher!r}")


def _as_list(x: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    xs = list(x)
    if not xs:
        raise ValueError(f"{what}: no tensors recorded")
    return xs


def _homogeneous(layer: KFACLayer, x: Tensor) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"layer {layer.name!r}: expanded inputs must be (N, T, fan_in), got "
                         f"shape {tuple(x.shape)}")
    if layer.bias is None:
        return x
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def input_factor(layer: KFACLayer, inputs: Tensor | Sequence[Tensor]) -> Tensor:
    r"""``A = (1/N) Σ_{n,t} ā ā^T`` from expanded inputs ``(N, T, fan_in)`` (as captured).

    Several tensors (several forward calls) are pooled: ``N`` is their total example count.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(nn.Sequential(nn.Linear(2, 1))).layers[0]
        >>> input_factor(layer, torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]]))
        tensor([[5.0000, 1.0000, 2.0000],
                [1.0000, 2.0000, 1.0000],
                [2.0000, 1.0000, 1.0000]])
    """
    xs = _as_list(inputs, f"layer {layer.name!r} inputs")
    if layer.kind == "embedding":
        return embedding_input_factor(layer, xs)
    total = None
    n = 0
    for x in xs:
        xh = _homogeneous(layer, x).flatten(0, 1)
        a = xh.T @ xh
        total = a if total is None else total + a
        n += x.shape[0]
    return total / n


def embedding_input_factor(layer: KFACLayer, inputs: Sequence[Tensor]) -> SplitMatrix:
    r"""Diagonal ``A`` of an embedding: ``A_vv = (1/N) · #{(n, t): token v}`` (a one-hot input's
    second moment), as a :class:`~curvlab.kfac.split.SplitMatrix` of ``1 × 1`` blocks.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(nn.Sequential(nn.Embedding(3, 2))).layers[0]
        >>> embedding_input_factor(layer, [torch.tensor([[0, 2], [2, 2]])]).dense().diagonal()
        tensor([0.5000, 0.0000, 1.5000])
    """
    v = layer.in_dim
    dtype = torch.float64 if layer.weight_param.dtype == torch.float64 else torch.float32
    counts, n = None, 0
    for x in inputs:
        c = torch.bincount(x.reshape(-1), minlength=v).to(dtype)
        counts = c if counts is None else counts + c
        n += x.shape[0]
    return SplitMatrix((counts / n).reshape(v, 1, 1), None)


def output_factor(
    layer: KFACLayer,
    output_grads: Tensor | Sequence[Tensor],
    num_examples: int,
    *,
    fisher: FisherType = "type2",
    reduction: str = "mean",
    mc_samples: int = 1,
) -> Tensor:
    r"""``G = (s/T) Σ_k Σ_{n,t} δ δ^T`` from captured output gradients ``(N, T, out)``.

    Args:
        layer: The layer.
        output_grads: One tensor per backward pass ``k`` (``FactorCapture.output_grads[name]``).
        num_examples: ``N`` of the batch (used by the empirical scale for ``'mean'``).
        fisher: Which quantity the passes propagated (sets ``s``, see the module docstring):
            ``"type2"`` (columns of ``rule.sqrt_hessian``), ``"mc"`` (``rule.sample_grads``;
            pass ``mc_samples``), ``"empirical"`` (the gradient of the actual loss, e.g. the
            optimizer's own training backward).
        reduction: The loss's reduction (``'mean'`` or ``'sum'``).
        mc_samples: Number of sampled passes for ``"mc"``.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(nn.Sequential(nn.Linear(2, 1))).layers[0]
        >>> # training backward of a mean loss over N=2 examples: per-example grads / N
        >>> output_factor(layer, torch.tensor([[[0.5]], [[-1.0]]]), 2, fisher="empirical")
        tensor([[2.5000]])
    """
    gs = _as_list(output_grads, f"layer {layer.name!r} output gradients")
    s = fisher_scale(fisher, num_examples, reduction, mc_samples)
    total = None
    for g in gs:
        if g.dim() != 3:
            raise ValueError(f"layer {layer.name!r}: output gradients must be (N, T, out), got "
                             f"shape {tuple(g.shape)}")
        gf = g.flatten(0, 1)
        c = gf.T @ gf / g.shape[1]
        total = c if total is None else total + c
    return total * s


def cross_input_factor(
    layer_i: KFACLayer, layer_j: KFACLayer, inputs_i: Tensor, inputs_j: Tensor
) -> Tensor:
    r"""Cross-layer ``A_{ij} = (1/N) Σ_n ā_i ā_j^T`` (Linear layers with ``T = 1``).

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> l0, l1 = find_layers(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))).layers
        >>> cross_input_factor(l0, l1, torch.ones(4, 1, 2), torch.ones(4, 1, 3)).shape
        torch.Size([3, 4])
    """
    a, b = _homogeneous(layer_i, inputs_i), _homogeneous(layer_j, inputs_j)
    if a.shape[1] != 1 or b.shape[1] != 1 or a.shape[0] != b.shape[0]:
        raise ValueError(f"cross-layer factors need (N, 1, .) inputs with equal N for layers "
                         f"{layer_i.name!r} and {layer_j.name!r}, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a[:, 0].T @ b[:, 0] / a.shape[0]


def cross_output_factor(
    layer_i: KFACLayer,
    layer_j: KFACLayer,
    grads_i: Sequence[Tensor],
    grads_j: Sequence[Tensor],
    num_examples: int,
    *,
    fisher: FisherType = "type2",
    reduction: str = "mean",
    mc_samples: int = 1,
) -> Tensor:
    r"""Cross-layer ``G_{ij} = s Σ_k Σ_n δ_{i,k,n} δ_{j,k,n}^T`` (same pass ``k``; ``T = 1``).

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> l0, l1 = find_layers(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))).layers
        >>> cross_output_factor(l0, l1, [torch.ones(4, 1, 3)], [torch.ones(4, 1, 1)], 4).shape
        torch.Size([3, 1])
    """
    gi, gj = _as_list(grads_i, "grads_i"), _as_list(grads_j, "grads_j")
    if len(gi) != len(gj):
        raise ValueError(f"layers {layer_i.name!r} and {layer_j.name!r} received {len(gi)} and "
                         f"{len(gj)} backward passes; cross statistics need the same passes")
    s = fisher_scale(fisher, num_examples, reduction, mc_samples)
    total = None
    for a, b in zip(gi, gj, strict=True):
        if a.shape[1] != 1 or b.shape[1] != 1:
            raise ValueError("cross-layer output factors need T = 1 (plain Linear layers)")
        c = a[:, 0].T @ b[:, 0]
        total = c if total is None else total + c
    return total * s


def _layer_list(layers: LayerTable | Sequence[KFACLayer]) -> list[KFACLayer]:
    return list(layers.layers if isinstance(layers, LayerTable) else layers)


def _cotangents(
    rule: LossRule, output: Tensor, targets: Any, fisher: str, mc_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    out = output.detach()
    if fisher == "type2":
        return rule.sqrt_hessian(out, targets)
    if fisher == "mc":
        return rule.sample_grads(out, mc_samples, generator, target=targets)
    if fisher == "empirical":
        return rule.grad(out, targets).unsqueeze(0)
    raise ValueError(f"fisher must be one of {_FISHER_TYPES}, got {fisher!r}")


def capture_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    layers: LayerTable | Sequence[KFACLayer],
    *,
    fisher: FisherType = "type2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[FactorCapture, int, LossRule]:
    """Run one forward and the Fisher-type backward passes; return the filled capture.

    The forward is a ``functional_call`` with cloned buffers (BatchNorm running statistics are
    not touched) and the backward passes use ``torch.autograd.grad`` (``.grad`` is not touched).
    Returns ``(capture, N, rule)``; ``capture.verify()`` has passed. A layer called several
    times (shared weights) is captured per call; use ``capture.layer_inputs`` /
    ``capture.layer_output_grads`` for its K-FAC-expand statistics.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> cap, n, _ = capture_statistics(net, nn.MSELoss(), torch.randn(4, 3),
        ...                                torch.randn(4, 2), find_layers(net))
        >>> n, len(cap.output_grads["0"])  # one pass per output column of the MSE sqrt-Hessian
        (4, 2)
    """
    if fisher not in _FISHER_TYPES:
        raise ValueError(f"fisher must be one of {_FISHER_TYPES}, got {fisher!r}")
    layer_list = _layer_list(layers)
    rule = loss_rule(loss_fn)
    weights = list({id(lay.weight_param): lay.weight_param for lay in layer_list}.values())
    for layer in layer_list:
        if not layer.weight_param.requires_grad:
            raise ValueError(f"layer {layer.name!r}: weight does not require grad; K-FAC needs "
                             "gradients through it")
    params = dict(model.named_parameters())
    cap = FactorCapture(layer_list)
    with cap:
        output = torch.func.functional_call(model, (params, cloned_buffers(model)), (inputs,))
    if not isinstance(output, Tensor):
        raise TypeError(f"{type(model).__name__} must return a single tensor, got "
                        f"{type(output).__name__}")
    rule.check(output, targets)
    cot = _cotangents(rule, output, targets, fisher, mc_samples, generator)
    num = cot.shape[0]
    for k in range(num):
        torch.autograd.grad(output, weights, grad_outputs=cot[k], retain_graph=k < num - 1,
                            allow_unused=True)
    cap.verify()
    return cap, batch_size_of(inputs), rule


def kfac_factors(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    layers: LayerTable | Sequence[KFACLayer],
    *,
    fisher: FisherType = "type2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: str = "expand",
) -> dict[str, KroneckerFactors]:
    """Kronecker factors of every layer on one batch (see the module docstring for the scale).

    ``kfac_approx`` for layers applied at ``T > 1`` shared positions (:func:`reduce_shared`):
    ``'expand'`` (every position like an example) or ``'reduce'`` (positions aggregated per
    example first).

    Args:
        model: The network (not modified; buffers are cloned, ``.grad`` untouched).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction ``'mean'`` or ``'sum'`` (``"empirical"`` also accepts other losses with a
            ``reduction`` attribute).
        inputs, targets: One batch.
        layers: From :func:`curvlab.kfac.layers.find_layers`.
        fisher: ``"type2"`` (exact output Fisher via the loss-Hessian square root, KFLR),
            ``"mc"`` (``mc_samples`` sampled targets per example) or ``"empirical"``.
        mc_samples: Samples for ``"mc"``.
        generator: ``torch.Generator`` for ``"mc"`` (reproducible sampling).

    Returns:
        ``{layer name: KroneckerFactors}``.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> f = kfac_factors(net, nn.MSELoss(reduction="sum"), torch.randn(4, 3),
        ...                  torch.randn(4, 2), find_layers(net))
        >>> f["0"].G  # MSE 'sum': Hessian 2I per example, summed over 4 examples
        tensor([[8., 0.],
                [0., 8.]])
    """
    cap, n, rule = capture_statistics(model, loss_fn, inputs, targets, layers, fisher=fisher,
                                      mc_samples=mc_samples, generator=generator)
    out = {}
    for layer in _layer_list(layers):
        x, gs = reduce_shared(layer, cap.layer_inputs(layer.name),
                              cap.layer_output_grads(layer.name), kfac_approx)
        out[layer.name] = KroneckerFactors(
            input_factor(layer, x),
            output_factor(layer, gs, n, fisher=fisher, reduction=rule.reduction,
                          mc_samples=mc_samples),
            n,
        )
    return out


KFAC_APPROX = ("expand", "reduce")


def reduce_shared(layer: KFACLayer, x: Tensor, grads: Sequence[Tensor], kfac_approx: str
                  ) -> tuple[Tensor, list[Tensor]]:
    r"""Expanded inputs and output gradients for K-FAC-expand or K-FAC-reduce.

    Eschenhagen et al. (NeurIPS 2023): for a layer applied at ``T`` shared positions per example,
    ``'expand'`` keeps every position (the default; exact for per-position losses on deep linear
    networks); ``'reduce'`` first aggregates per example, ``â_n = (1/T) Σ_t a_{n,t}`` (ones
    column included, so it stays 1) and ``ĝ_n = Σ_t g_{n,t}`` (exact when the shared dimension is
    reduced before the loss, e.g. mean pooling), then forms ``A`` and ``G`` from ``N`` vectors.
    Embeddings always expand (their one-hot inputs keep ``A`` diagonal).

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(nn.Sequential(nn.Linear(1, 1, bias=False))).layers[0]
        >>> x, g = reduce_shared(layer, torch.tensor([[[1.0], [3.0]]]),
        ...                      [torch.tensor([[[1.0], [1.0]]])], "reduce")
        >>> x.tolist(), g[0].tolist()
        ([[[2.0]]], [[[2.0]]])
    """
    if kfac_approx not in KFAC_APPROX:
        raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
    if kfac_approx == "expand" or layer.kind == "embedding" or x.shape[1] == 1:
        return x, list(grads)
    return x.mean(1, keepdim=True), [g.sum(1, keepdim=True) for g in grads]


def accumulate_factors(
    per_batch: Sequence[Mapping[str, KroneckerFactors]], reduction: str = "mean"
) -> dict[str, KroneckerFactors]:
    """Combine factors of several batches as if they were one concatenated batch.

    ``A`` is averaged weighted by example counts; ``G`` is averaged the same way for
    ``reduction='mean'`` (each batch's ``G`` carries its own ``1/N_b``) and summed for
    ``'sum'``. (For ``'mean'`` losses whose number of loss terms per example differs between
    batches, e.g. variable spatial sizes, weights by examples differ from ``curvlab.GGN``'s
    weights by loss terms.)

    Example:
        >>> a = {"l": KroneckerFactors(torch.eye(1), torch.eye(1), 1)}
        >>> b = {"l": KroneckerFactors(4 * torch.eye(1), 4 * torch.eye(1), 3)}
        >>> c = accumulate_factors([a, b], reduction="sum")["l"]
        >>> c.A.item(), c.G.item(), c.num_examples
        (3.25, 5.0, 4)
    """
    if not per_batch:
        raise ValueError("accumulate_factors: no batches")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    names = list(per_batch[0])
    out = {}
    for name in names:
        fs = [b[name] for b in per_batch]
        n = sum(f.num_examples for f in fs)
        a = sum(f.A * (f.num_examples / n) for f in fs)
        if reduction == "mean":
            g = sum(f.G * (f.num_examples / n) for f in fs)
        else:
            g = sum(f.G for f in fs)
        out[name] = KroneckerFactors(a, g, n)
    return out
