r"""The Kronecker-factored engine: every K-FAC entry point of curvlab is built on it.

:class:`KroneckerEngine` holds one :class:`~curvlab.kfac.blocks.KroneckerBlock` per registered
layer (and, for ``structure='block-tridiagonal'``, the cross-layer factors of the chain) and
offers the four operations the :class:`curvlab.KFAC` operator, the K-FAC optimizer and
:class:`curvlab.KFACPreconditioner` share:

* :meth:`~KroneckerEngine.statistics` — new ``A``, ``G`` (and cross factors) of every layer from
  a filled :class:`~curvlab.kfac.capture.FactorCapture`, in the factor dtype (float32, float64
  for float64 parameters) with autocast off, scaled as in :mod:`curvlab.kfac.factors`;
* :meth:`~KroneckerEngine.update` (exponential moving average) or
  :meth:`~KroneckerEngine.set_factors` (an estimate over a data set), plus the EKFAC scalings;
* :meth:`~KroneckerEngine.refresh` — guarded eigendecompositions of the stale blocks;
* :meth:`~KroneckerEngine.precondition` / :meth:`~KroneckerEngine.multiply` — the damped block
  inverse (or the block) applied to parameter-shaped gradients or to per-layer matrices.

Options mean the same at every entry point: ``fisher`` (``'type2'`` | ``'mc'`` |
``'empirical'``), ``inverse`` (``'eigen'`` | ``'factored'``), ``ekfac``, ``structure``,
grouped convolutions (one block per group), shared weights (K-FAC-expand over the calls, see
:mod:`curvlab.kfac.capture`), and unsupported modules (:func:`register_layers`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.kfac.blocks import InverseKind, KroneckerBlock, check_inverse
from curvlab.kfac.capture import FactorCapture
from curvlab.kfac.ekfac import ekfac_scalings
from curvlab.kfac.factors import (
    KFAC_APPROX,
    KroneckerFactors,
    cross_input_factor,
    cross_output_factor,
    fisher_scale,
    input_factor,
    output_factor,
    reduce_shared,
)
from curvlab.kfac.inverse import EighError
from curvlab.kfac.layers import KFACLayer, LayerTable, find_layers
from curvlab.kfac.refresh import FixedRefresh, RefreshPolicy
from curvlab.kfac.split import SplitMatrix, split_gram
from curvlab.kfac.tridiagonal import TridiagonalFactors, TridiagonalInverse
from curvlab.kfac.unitwise import (
    NORM_TYPES,
    NormLayer,
    UnitWiseBlock,
    find_norm_layers,
    unit_fisher,
)

__all__ = ["FISHER_TYPES", "KroneckerEngine", "LayerStatistics", "register_layers"]

FISHER_TYPES = ("type2", "mc", "empirical")
Structure = Literal["block-diagonal", "block-tridiagonal"]
STRUCTURES = ("block-diagonal", "block-tridiagonal")


def register_layers(
    model: nn.Module, selected: Mapping[str, Tensor] | Sequence[str], *, strict: bool, who: str,
    fallback: str = "", unitwise: bool = True,
) -> LayerTable:
    """The one registration policy of every K-FAC entry point.

    ``nn.Linear`` and ``nn.Conv2d`` layers are registered (grouped convolutions as one block per
    group); with ``unitwise=True`` (default) the affine parameters of BatchNorm, LayerNorm and
    GroupNorm get SP-NGD's unit-wise blocks (``table.norm``, :mod:`curvlab.kfac.unitwise`).
    Selected parameters of any other module get no block: one warning names
    them (``strict=True`` raises ``ValueError`` instead); what that means is each entry point's
    documented fallback (the operator is zero there, the optimizer and the preconditioner pass
    the gradient through), stated in the warning by ``fallback``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.PReLU())
        >>> table = register_layers(net, dict(net.named_parameters()), strict=True,
        ...                         who="demo", unitwise=True)  # doctest: +SKIP
        >>> register_layers(net, dict(net.named_parameters()), strict=True, who="demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: K-FAC does not support these modules/parameters: 2 (PReLU: no Kronecker-factored rule for this module type): 2.weight; exclude them with params= or pass strict=False
    """  # noqa: E501
    names = list(selected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = find_layers(model, names, strict=False, grouped_conv=True)
    if unitwise:
        modules = dict(model.named_modules())
        norm_mods = [m for m in table.unsupported if isinstance(modules.get(m), NORM_TYPES)]
        by_id = {id(p): n for n, p in model.named_parameters() if n in set(names)}
        table.norm = [la for la in find_norm_layers(model, by_id) if la.name in norm_mods]
        for la in table.norm:
            rest = [n for n in table.unsupported[la.name] if n not in la.param_names]
            if rest:
                table.unsupported[la.name] = rest
            else:
                del table.unsupported[la.name]
                table.reasons.pop(la.name, None)
    if table.unsupported:
        detail = "; ".join(f"{m or '<root>'} ({table.reasons.get(m, '?')}): {', '.join(ps)}"
                           for m, ps in table.unsupported.items())
        if strict:
            raise ValueError(f"{who}: K-FAC does not support these modules/parameters: {detail}"
                             "; exclude them with params= or pass strict=False")
        warnings.warn(f"{who}: no Kronecker-factored block for {detail}"
                      + (f"; {fallback}" if fallback else ""), UserWarning, stacklevel=3)
    return table


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


class KroneckerEngine:
    r"""Kronecker blocks of a model's registered layers (see the module docstring).

    Args:
        layers: Registered layers (a :class:`~curvlab.kfac.layers.LayerTable` or a list).
        fisher: ``'type2'``, ``'mc'`` or ``'empirical'``: what the captured backward passes
            propagated (sets the scale of ``G``, :func:`curvlab.kfac.factors.fisher_scale`).
        reduction: The loss's reduction, ``'mean'`` or ``'sum'``.
        mc_samples: Sampled passes per step for ``fisher='mc'``.
        inverse: ``'eigen'`` or ``'factored'`` (:mod:`curvlab.kfac.blocks`).
        ekfac: Keep EKFAC scalings.
        ema_decay: Maximal weight of old statistics in :meth:`update`.
        structure: ``'block-diagonal'`` or ``'block-tridiagonal'`` (a chain of ``nn.Linear``
            layers called once each; Martens & Grosse §4.3; its inverse always uses the
            π-split factored damping of the diagonal blocks).
        pi: π of the factored damping (``'tracenorm'`` or a positive number).
        refresh: A :class:`~curvlab.kfac.refresh.RefreshPolicy` deciding per layer and step
            which statistics are recomputed and which inverses refreshed (default
            :class:`~curvlab.kfac.refresh.FixedRefresh` with K-FAC's intervals 1 and 20).
        split_dim: THOR's block splitting (:mod:`curvlab.kfac.split`): factors larger than
            ``split_dim`` are block-diagonal with blocks of at most ``split_dim``; their
            statistics are computed blockwise. ``None``: no splitting.
        norm_layers: Normalization layers with unit-wise blocks (default: ``layers.norm`` of
            a :class:`~curvlab.kfac.layers.LayerTable`, else none).
        kfac_approx: ``'expand'`` or ``'reduce'`` for layers applied at several shared
            positions (sequences, patches; :func:`curvlab.kfac.factors.reduce_shared`).
        stats_fraction: Estimate the factors from the first ``⌈f·N⌉`` examples of each batch
            (Martens & Grosse use 1/8): ``A`` is their mean, ``G`` (and EKFAC scalings, unit-wise
            blocks) rescaled by ``N/m`` so the scale is that of the whole batch. Saves factor
            products; the sampled backward still runs over the batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> engine = KroneckerEngine(find_layers(net), fisher="empirical")
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> with FactorCapture(engine.layers) as cap:
        ...     nn.functional.cross_entropy(net(x), y).backward()
        >>> engine.update(engine.statistics(cap, num_examples=8))
        >>> engine.refresh()
        2
        >>> grads = {n: p.grad for n, p in net.named_parameters()}
        >>> pre = engine.precondition(grads, damping=1e-2)
        >>> sorted(pre) == sorted(grads)
        True
    """

    def __init__(
        self,
        layers: LayerTable | Sequence[KFACLayer],
        *,
        fisher: str = "type2",
        reduction: str = "mean",
        mc_samples: int = 1,
        inverse: InverseKind = "eigen",
        ekfac: bool = False,
        ema_decay: float = 0.95,
        structure: Structure = "block-diagonal",
        pi: str | float = "tracenorm",
        refresh: RefreshPolicy | None = None,
        split_dim: int | None = None,
        norm_layers: Sequence[NormLayer] | None = None,
        kfac_approx: str = "expand",
        stats_fraction: float = 1.0,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"K-FAC needs a loss with reduction 'mean' or 'sum', got "
                             f"{reduction!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be 'block-diagonal' or 'block-tridiagonal', got "
                             f"{structure!r}")
        check_inverse(inverse, ekfac)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        self.kfac_approx = kfac_approx
        if isinstance(stats_fraction, bool) or not isinstance(stats_fraction, int | float) \
                or not 0 < stats_fraction <= 1:
            raise ValueError(f"stats_fraction must be in (0, 1], got {stats_fraction!r}")
        if stats_fraction < 1 and structure == "block-tridiagonal":
            raise ValueError("stats_fraction < 1 cannot be combined with "
                             "structure='block-tridiagonal'")
        self.stats_fraction = float(stats_fraction)
        self.layers: list[KFACLayer] = list(layers.layers if isinstance(layers, LayerTable)
                                            else layers)
        if norm_layers is None:
            norm_layers = layers.norm if isinstance(layers, LayerTable) else []
        self.norm_layers: list[NormLayer] = list(norm_layers)
        if structure == "block-tridiagonal":
            bad = [la.name for la in self.layers if la.kind != "linear" or la.group is not None]
            if split_dim is not None:
                raise ValueError("structure='block-tridiagonal' cannot be combined with "
                                 "split_dim")
            if bad or ekfac:
                raise ValueError(
                    "structure='block-tridiagonal' supports chains of nn.Linear layers; got "
                    f"other layers {bad}" if bad else
                    "structure='block-tridiagonal' cannot be combined with ekfac=True")
        self.fisher, self.reduction, self.mc_samples = fisher, reduction, int(mc_samples)
        self.inverse, self.ekfac, self.structure = inverse, bool(ekfac), structure
        self.ema_decay = float(ema_decay)
        self.blocks: dict[str, KroneckerBlock] = {
            la.name: KroneckerBlock(la, inverse=inverse, ema_decay=ema_decay, pi=pi,
                                    ekfac=ekfac and la.kind != "embedding",  # A is diagonal
                                    split_dim=split_dim)
            for la in self.layers}
        self.split_dim = split_dim
        for la in self.norm_layers:
            self.blocks[la.name] = UnitWiseBlock(la, ema_decay=ema_decay)
        self.pi = pi
        if refresh is not None and not isinstance(refresh, RefreshPolicy):
            raise TypeError(f"refresh must be a curvlab.kfac RefreshPolicy, got "
                            f"{type(refresh).__name__}")
        self.policy: RefreshPolicy = refresh if refresh is not None else FixedRefresh()
        self.policy.bind(list(self.blocks), [la.name for la in self.norm_layers])
        self._updated: set[str] = set()
        #: Per-layer counts of factor updates and inverse refreshes.
        self.layer_counters: dict[str, dict[str, int]] = {
            n: {"factor_updates": 0, "inverse_updates": 0} for n in self.blocks}
        # block-tridiagonal chain state
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}
        self.cross_updates = 0
        self.chain: TridiagonalFactors | None = None  # the factors at the last refresh
        self._chain_inverses: dict[float, TridiagonalInverse] = {}

    # ---- statistics ----------------------------------------------------------------------
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

        def rescale(t):
            return t if m >= num_examples else t * (num_examples / m)

        for layer in self.layers:
            name = layer.name
            need_a, need_g = (True, True) if due is None else due.get(name, (False, False))
            if not capture.inputs[name] or not (need_a or need_g):
                continue
            gs = grads.get(name, []) if grads is not None else capture.layer_output_grads(name)
            if self.fisher == "empirical" and grads is None:
                gs = gs[:1]
            elif passes is not None:
                gs = gs[-passes:] if passes else []
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
            gs = grads.get(name, []) if grads is not None else capture.layer_output_grads(name)
            if self.fisher == "empirical" and grads is None:
                gs = gs[:1]
            elif passes is not None:
                gs = gs[-passes:] if passes else []
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

    def due_statistics(self, step: int) -> dict[str, tuple[bool, bool]]:
        """``{layer: (A due, G due)}`` at ``step`` (counted from 0) by the refresh policy."""
        return {name: self.policy.stats_due(step, name) for name in self.blocks}

    def update(self, stats: LayerStatistics, step: int | None = None) -> None:
        """Average ``stats`` into the blocks (and the chain's cross factors); with ``step`` the
        refresh policy observes each updated factor."""
        if stats.cross:
            k = self.cross_updates + 1
            eps = min(1.0 - 1.0 / k, self.ema_decay)
            for i, (ca, cg) in stats.cross.items():
                if i in self.cross and eps > 0.0:
                    oa, og = self.cross[i]
                    self.cross[i] = (eps * oa + (1.0 - eps) * ca, eps * og + (1.0 - eps) * cg)
                else:
                    self.cross[i] = (ca.clone(), cg.clone())
            self.cross_updates += 1
        self._updated = set(stats.A) | set(stats.G) | set(stats.F)
        for name, f in stats.F.items():
            block = self.blocks[name]
            old = block.F
            block.update(f)
            self.layer_counters[name]["factor_updates"] += 1
            if step is not None:
                self.policy.observe_update(step, name, "F", old, f)
        for name in set(stats.A) | set(stats.G):
            block = self.blocks[name]
            new_a, new_g = stats.A.get(name), stats.G.get(name)
            old_a, old_g = block.A, block.G
            block.update(new_a, new_g)
            self.layer_counters[name]["factor_updates"] += 1
            if step is not None:
                for what, old, new in (("A", old_a, new_a), ("G", old_g, new_g)):
                    if new is not None:
                        self.policy.observe_update(step, name, what, old, new)

    def refresh_due(self, step: int) -> int:
        """Refresh the inverses the policy calls for at ``step`` (only blocks whose factors
        changed since their last refresh, or that have none yet); return how many."""
        if self.structure == "block-tridiagonal":
            due = [n for n, b in self.blocks.items() if self.policy.inverse_due(
                step, n, b.factors(), n in self._updated)]
            if not due or not self.stale:
                return 0
            done = self.refresh()
            names = list(self.blocks) if done else []
        else:
            names = []
            for name, block in self.blocks.items():
                if not block.has_factors or not (block.stale or block.eig is None):
                    continue
                if not self.policy.inverse_due(step, name, block.factors(),
                                               name in self._updated):
                    continue
                if block.refresh():
                    names.append(name)
            done = len(names)
        for name in names:
            b = self.blocks[name]
            self.layer_counters[name]["inverse_updates"] += 1
            self.policy.observe_refresh(step, name, b.factors())
        self._updated = set()
        return done

    def set_factors(self, factors: Mapping[str, KroneckerFactors],
                    cross: TridiagonalFactors | None = None) -> None:
        """Set every block's factors (an estimate over a data set; no averaging)."""
        for name, f in factors.items():
            if isinstance(f, Tensor):  # unit-wise blocks (U, d, d)
                self.blocks[name].set_factors(f)
            else:
                self.blocks[name].set_factors(f.A, f.G)
        if cross is not None:
            self.cross = {i: (ca, cg) for i, (ca, cg) in
                          enumerate(zip(cross.cross_A, cross.cross_G, strict=True))}
            self.cross_updates = max(self.cross_updates, 1)

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

    def update_scalings(self, stats: LayerStatistics) -> None:
        """Average the EKFAC scalings of ``stats`` into the blocks (``ekfac=True``)."""
        for name, s in self.ekfac_statistics(stats).items():
            self.blocks[name].update_scalings(s)

    # ---- inverses ------------------------------------------------------------------------
    @property
    def stale(self) -> bool:
        """Some block has new factors, or a block with factors has no inverse yet."""
        return any(b.stale or (b.has_factors and b.eig is None) for b in self.blocks.values())

    @property
    def ready(self) -> bool:
        """Some block has an inverse."""
        return any(b.eig is not None for b in self.blocks.values())

    def refresh(self, names: Sequence[str] | None = None) -> int:
        """Eigendecompose the stale blocks (or those named); return how many were refreshed.

        Failures warn and keep the last good decomposition. For the block-tridiagonal chain the
        factors are also snapshotted for its inverse.
        """
        if self.structure == "block-tridiagonal" and len(self.cross) == len(self.layers) - 1 \
                and all(b.has_factors for b in self.blocks.values()):
            self._chain_inverses.clear()
            self.chain = TridiagonalFactors(
                [KroneckerFactors(self.blocks[la.name].A.clone(), self.blocks[la.name].G.clone(),
                                  0) for la in self.layers],
                [self.cross[i][0].clone() for i in range(len(self.layers) - 1)],
                [self.cross[i][1].clone() for i in range(len(self.layers) - 1)])
        todo = list(self.blocks) if names is None else list(names)
        done = 0
        for name in todo:
            block = self.blocks[name]
            if not block.has_factors:
                continue
            if names is None and not (block.stale or block.eig is None):
                continue
            done += bool(block.refresh())
        return done

    def chain_inverse(self, damping: float) -> TridiagonalInverse | None:
        """Martens & Grosse's block-tridiagonal inverse at the last refresh (``None`` if it is
        unavailable, warned)."""
        if self.chain is None:
            return None
        if damping not in self._chain_inverses:
            try:
                inv = TridiagonalInverse(self.chain, damping, pi=self.pi)
            except (EighError, ValueError) as err:
                warnings.warn(f"K-FAC: block-tridiagonal inverse failed ({err}); using the "
                              "block-diagonal inverse", RuntimeWarning, stacklevel=3)
                return None
            if len(self._chain_inverses) > 4:
                self._chain_inverses.clear()
            self._chain_inverses[damping] = inv
        return self._chain_inverses[damping]

    def multiply(self, mats: Mapping[str, Tensor], power: int = -1, damping: float = 0.0, *,
                 inverse: InverseKind | None = None) -> dict[str, Tensor]:
        """``(block + damping)^power`` per layer on matrices ``{name: (..., out, in)}``.

        With ``structure='block-tridiagonal'`` and ``power=-1`` the chain inverse is used (all
        layers needed); ``power=1`` then applies the block-tridiagonal matrix.
        """
        chain = [la.name for la in self.layers]
        if self.structure == "block-tridiagonal" and all(n in mats for n in chain):
            rest = {n: self.blocks[n].multiply(m, power, damping)
                    for n, m in mats.items() if n not in set(chain)}
            return {**self._chain_multiply(mats, power, damping), **rest}
        return {name: self.blocks[name].multiply(m, power, damping, inverse=inverse)
                for name, m in mats.items()}

    def _chain_multiply(self, mats: Mapping[str, Tensor], power: int,
                        damping: float) -> dict[str, Tensor]:
        if True:
            vs = [mats[la.name] for la in self.layers]
            if power == 1:
                chain = self._current_chain()
                out = chain.mv([v.to(chain.diag[0].A.dtype) for v in vs])
                out = [o + damping * v if damping else o for o, v in zip(out, vs, strict=True)]
                return {la.name: o.to(v.dtype) for la, o, v in zip(self.layers, out, vs,
                                                                    strict=True)}
            inv = self.chain_inverse(damping)
            if inv is not None:
                dtype = inv.inv_A[0].dtype
                res = inv.apply([v.to(dtype) for v in vs])
                return {la.name: u.to(v.dtype) for la, u, v in zip(self.layers, res, vs,
                                                                    strict=True)}
        return {la.name: self.blocks[la.name].multiply(mats[la.name], power, damping)
                for la in self.layers}

    def _current_chain(self) -> TridiagonalFactors:
        return TridiagonalFactors(
            [KroneckerFactors(self.blocks[la.name].A, self.blocks[la.name].G, 0)
             for la in self.layers],
            [self.cross[i][0] for i in range(len(self.layers) - 1)],
            [self.cross[i][1] for i in range(len(self.layers) - 1)])

    def precondition(self, grads: Mapping[str, Tensor], damping: float, *,
                     inverse: InverseKind | None = None) -> dict[str, Tensor]:
        """The damped block inverse applied to parameter-shaped gradients ``{name: grad}``.

        Returns ``{name: preconditioned}`` for the parameters of layers that have an inverse
        (grouped convolutions: every group's rows); all other names are left out. Work is done
        in the factor dtype with autocast off; results have the gradients' dtype.
        """
        mats: dict[str, Tensor] = {}
        for layer in self.layers:
            if self.blocks[layer.name].eig is None or layer.weight not in grads:
                continue
            if layer.bias is not None and layer.bias not in grads:
                continue
            mats[layer.name] = layer.to_matrix(
                grads[layer.weight], None if layer.bias is None else grads[layer.bias])
        for layer in self.norm_layers:
            if self.blocks[layer.name].eig is None or layer.weight not in grads or (
                    layer.bias is not None and layer.bias not in grads):
                continue
            mats[layer.name] = self.unit_matrix(layer, grads)
        if not mats:
            return {}
        device = next(iter(mats.values())).device
        with torch.autocast(device_type=device.type, enabled=False):
            res = self.multiply(mats, -1, damping, inverse=inverse)
        out: dict[str, Tensor] = {}
        for layer in self.norm_layers:
            if layer.name in res:
                out.update(self.unit_params(layer, res[layer.name], grads))
        for layer in self.layers:
            if layer.name not in res:
                continue
            w, b = layer.from_matrix(res[layer.name])
            if layer.group is None:
                out[layer.weight] = w.reshape(grads[layer.weight].shape)
                if layer.bias is not None:
                    out[layer.bias] = b
                continue
            for pname, part in ((layer.weight, w), (layer.bias, b)):
                if pname is None:
                    continue
                if pname not in out:
                    out[pname] = grads[pname].clone()
                out[pname][layer.out_slice] = part.to(out[pname].dtype)
        return out

    @staticmethod
    def unit_matrix(layer: NormLayer, params: Mapping[str, Tensor]) -> Tensor:
        """``(..., U, d)`` unit-wise form of ``(γ, β)``-shaped tensors (leading dims kept)."""
        w = params[layer.weight]
        lead = w.shape[:w.dim() - layer.weight_param.dim()]
        cols = [w.reshape(*lead, layer.units)]
        if layer.bias is not None:
            cols.append(params[layer.bias].reshape(*lead, layer.units))
        return torch.stack(cols, dim=-1)

    @staticmethod
    def unit_params(layer: NormLayer, m: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`unit_matrix`."""
        out = {layer.weight: m[..., 0].reshape(like[layer.weight].shape)}
        if layer.bias is not None:
            out[layer.bias] = m[..., 1].reshape(like[layer.bias].shape)
        return out

    # ---- bookkeeping ---------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the factors, by the inverses, and their total."""
        factors = inverses = 0
        for b in self.blocks.values():
            m = b.memory_bytes()
            factors += m["factors"]
            inverses += m["inverses"]
        factors += sum(t.numel() * t.element_size() for c in self.cross.values() for t in c)
        return {"factors": factors, "inverses": inverses, "total": factors + inverses}

    def state_dict(self) -> dict[str, Any]:
        """Every block's state, the chain's cross factors and snapshot (tensors cloned)."""
        return {
            "blocks": {name: b.state_dict() for name, b in self.blocks.items()},
            "cross": {i: tuple(t.clone() for t in c) for i, c in self.cross.items()},
            "cross_updates": self.cross_updates,
            "chain": None if self.chain is None else copy.deepcopy(self.chain),
            "policy": self.policy.state_dict(),
            "layer_counters": {n: dict(c) for n, c in self.layer_counters.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the saved layers must be this engine's layers."""
        saved, mine = set(state["blocks"]), set(self.blocks)
        if saved != mine:
            raise ValueError(
                f"K-FAC state is for layers {sorted(saved)}, this engine has {sorted(mine)} "
                f"(missing: {sorted(mine - saved)}, unknown: {sorted(saved - mine)})")
        for name, s in state["blocks"].items():
            self.blocks[name].load_state_dict(s)
        self.cross = {int(i): tuple(t.clone() for t in c) for i, c in state["cross"].items()}
        self.cross_updates = int(state["cross_updates"])
        self.chain = None if state["chain"] is None else copy.deepcopy(state["chain"])
        self._chain_inverses.clear()
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
            self.layer_counters = {n: dict(c) for n, c in state["layer_counters"].items()}
