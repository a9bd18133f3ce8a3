"""New statistics of one step from a filled capture: :class:`LayerStatistics` and the engine's
statistics methods (:class:`StatisticsMixin`, used by :class:`curvlab.kfac.KroneckerEngine`).

Scales as in :mod:`curvlab.kfac.factors` (block-split factors blockwise, embeddings' diagonal
``A``, unit-wise blocks, the block-tridiagonal chain's cross factors, ``stats_fraction``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlab.kfac.blocks import KroneckerBlock
from curvlab.kfac.capture import FactorCapture
from curvlab.kfac.ekfac import ekfac_scalings
from curvlab.kfac.factors import (
    cross_input_factor,
    cross_output_factor,
    fisher_scale,
    input_factor,
    output_factor,
    reduce_shared,
)
from curvlab.kfac.layers import KFACLayer
from curvlab.kfac.split import SplitMatrix, split_gram
from curvlab.kfac.unitwise import unit_fisher

__all__ = ["LayerStatistics", "StatisticsMixin"]


@dataclass
class LayerStatistics:
    """New statistics of one step, ready for :meth:`KroneckerEngine.update`.

    Attributes:
        A, G: ``{layer name: factor}`` of the layers that received statistics.
        used: ``{layer name: (expanded inputs, [output gradients per pass])}`` (EKFAC).
        cross: ``{i: (A_{i,i+1}, G_{i,i+1})}`` for the block-tridiagonal chain.
        num_examples: ``N`` of the batch.
        F: ``{norm layer name: (U, d, d)}`` unit-wise Fisher blocks.
        subset, subset_scale: Examples the statistics used (``stats_fraction``) and ``N / m``.
    """

    A: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    used: dict[str, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)
    cross: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    num_examples: int = 0
    F: dict[str, Tensor] = field(default_factory=dict)
    subset: int = 0
    subset_scale: float = 1.0

    def tensors(self) -> list[Tensor]:
        out = []
        for t in [*self.A.values(), *self.G.values(), *self.F.values(),
                  *[t for c in self.cross.values() for t in c]]:
            out.extend(t.parts() if isinstance(t, SplitMatrix) else [t])
        return out

    def is_finite(self) -> bool:
        ts = self.tensors()
        return not ts or bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def _factor_dtype(layer: KFACLayer) -> torch.dtype:
    return torch.float64 if layer.weight_param.dtype == torch.float64 else torch.float32


class StatisticsMixin:
    """The statistics half of :class:`~curvlab.kfac.KroneckerEngine` (needs its ``layers``,
    ``norm_layers``, ``blocks``, ``fisher``, ``reduction``, ``mc_samples``, ``kfac_approx``,
    ``stats_fraction`` and ``structure``)."""

    def statistics(
        self, capture: FactorCapture, num_examples: int, *, passes: int | None = None,
        grads: Mapping[str, list[Tensor]] | None = None,
        due: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> LayerStatistics:
        """New factors of every layer that received statistics in ``capture``.

        Args:
            capture: A filled capture over :attr:`layers`.
            num_examples: ``N`` of the batch.
            passes: Which recorded backward passes carry the Fisher statistics: ``None`` uses
                all of them (``fisher='empirical'``: the first), an int ``k`` the last ``k``.
            grads: Per-layer output gradients (one tensor per pass) to use instead of the
                capture's (e.g. the preconditioner's separately recorded sampled passes).
            due: ``{name: (A due, G due)}`` from :meth:`due_statistics`; factors not due are
                not computed (default: all).
        """
        stats = LayerStatistics(num_examples=num_examples)
        m = num_examples if self.stats_fraction >= 1.0 else max(
            1, math.ceil(self.stats_fraction * num_examples))
        stats.subset, stats.subset_scale = m, num_examples / m

        def subset(x: Tensor, gs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
            if m >= num_examples:
                return x, gs
            return x[:m], [g[:m] for g in gs]

        def fisher_passes(name: str) -> list[Tensor]:
            """The recorded passes carrying the Fisher statistics of layer ``name``."""
            gs = grads.get(name, []) if grads is not None else capture.layer_output_grads(name)
            if self.fisher == "empirical" and grads is None:
                return gs[:1]
            if passes is not None:
                return gs[-passes:] if passes else []
            return gs

        def rescale(t):
            return t if m >= num_examples else t * (num_examples / m)

        for layer in self.layers:
            name = layer.name
            need_a, need_g = (True, True) if due is None else due.get(name, (False, False))
            if not capture.inputs[name] or not (need_a or need_g):
                continue
            gs = fisher_passes(name)
            if not gs and need_g:
                continue
            dtype = _factor_dtype(layer)
            x, gs = reduce_shared(layer, *subset(capture.layer_inputs(name), gs),
                                  self.kfac_approx)
            block = self.blocks[name]
            with torch.autocast(device_type=x.device.type, enabled=False):
                xs = x if layer.kind == "embedding" else x.to(dtype)  # token indices stay
                gs = [g.to(dtype) for g in gs]
                if need_a:
                    stats.A[name] = self._split_input_factor(block, xs) \
                        if block.splits(layer.in_dim) and layer.kind != "embedding" \
                        else input_factor(layer, [xs])
                if need_g:
                    stats.G[name] = rescale(
                        self._split_output_factor(block, gs, num_examples)
                        if block.splits(layer.out_dim) else output_factor(
                            layer, gs, num_examples, fisher=self.fisher,
                            reduction=self.reduction, mc_samples=self.mc_samples))
            if need_a and need_g:
                stats.used[name] = (x, gs)
        for layer in self.norm_layers:
            name = layer.name
            need = (True, True) if due is None else due.get(name, (False, False))
            if not capture.inputs[name] or not any(need):
                continue
            gs = fisher_passes(name)
            if not gs:
                continue
            dtype = _factor_dtype(layer)
            x, gs = subset(capture.layer_inputs(name), gs)
            with torch.autocast(device_type=x.device.type, enabled=False):
                stats.F[name] = rescale(unit_fisher(
                    layer, x.to(dtype), [g.to(dtype) for g in gs], num_examples,
                    fisher=self.fisher, reduction=self.reduction, mc_samples=self.mc_samples))
        if self.structure == "block-tridiagonal" and len(stats.used) == len(self.layers):
            stats.cross = self._cross_statistics(capture, stats)
        return stats

    @staticmethod
    def _split_input_factor(block: KroneckerBlock, x: Tensor) -> SplitMatrix:
        """Blockwise ``A`` (same scale as :func:`~curvlab.kfac.factors.input_factor`)."""
        if block.layer.bias is not None:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return split_gram(x.flatten(0, 1), block.split_dim) / x.shape[0]

    def _split_output_factor(self, block: KroneckerBlock, gs: list[Tensor],
                             num_examples: int) -> SplitMatrix:
        """Blockwise ``G`` (same scale as :func:`~curvlab.kfac.factors.output_factor`)."""
        s = fisher_scale(self.fisher, num_examples, self.reduction, self.mc_samples)
        total = None
        for g in gs:
            c = split_gram(g.flatten(0, 1), block.split_dim) / g.shape[1]
            total = c if total is None else total + c
        return total * s

    def _cross_statistics(self, capture: FactorCapture,
                          stats: LayerStatistics) -> dict[int, tuple[Tensor, Tensor]]:
        out = {}
        for i, (a, b) in enumerate(zip(self.layers[:-1], self.layers[1:], strict=True)):
            (xa, ga), (xb, gb) = stats.used[a.name], stats.used[b.name]
            if capture.calls(a.name) != 1 or capture.calls(b.name) != 1 or xa.shape[1] != 1 \
                    or xb.shape[1] != 1 or len(ga) != len(gb):
                raise ValueError(
                    f"structure='block-tridiagonal': layers {a.name!r} and {b.name!r} must be "
                    "called once per forward on (N, features) inputs")
            dtype = _factor_dtype(a)
            with torch.autocast(device_type=xa.device.type, enabled=False):
                ca = cross_input_factor(a, b, xa.to(dtype), xb.to(dtype))
                cg = cross_output_factor(a, b, [g.to(dtype) for g in ga],
                                         [g.to(dtype) for g in gb], stats.num_examples,
                                         fisher=self.fisher, reduction=self.reduction,
                                         mc_samples=self.mc_samples)
            out[i] = (ca, cg)
        return out

    def ekfac_statistics(self, stats: LayerStatistics) -> dict[str, Tensor]:
        """EKFAC scalings of ``stats`` in each block's current eigenbasis (blocks without one
        are left out)."""
        out = {}
        for name, (x, gs) in stats.used.items():
            block = self.blocks[name]
            if block.eig is None or not block.ekfac:
                continue
            with torch.autocast(device_type=x.device.type, enabled=False):
                s = ekfac_scalings(
                    block.layer, x, gs, block.eig.eigenvectors_A, block.eig.eigenvectors_G,
                    stats.num_examples if stats.subset_scale != 1.0 else x.shape[0],
                    fisher=self.fisher, reduction=self.reduction, mc_samples=self.mc_samples)
                out[name] = s if stats.subset_scale == 1.0 else s * stats.subset_scale
        return out
