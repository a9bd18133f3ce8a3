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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from curvlab.kfac.blocks import InverseKind, KroneckerBlock, check_inverse
from curvlab.kfac.chain import ChainMixin
from curvlab.kfac.factors import (
    KFAC_APPROX,
    KroneckerFactors,
)
from curvlab.kfac.inverse import safe_eigh_many
from curvlab.kfac.layers import KFACLayer, LayerTable
from curvlab.kfac.refresh import FixedRefresh, RefreshPolicy
from curvlab.kfac.registration import register_layers
from curvlab.kfac.statistics import LayerStatistics, StatisticsMixin
from curvlab.kfac.tridiagonal import TridiagonalFactors, TridiagonalInverse
from curvlab.kfac.unitwise import (
    NormLayer,
    UnitWiseBlock,
)

__all__ = ["FISHER_TYPES", "KroneckerEngine", "LayerStatistics", "register_layers"]

FISHER_TYPES = ("type2", "mc", "empirical")
Structure = Literal["block-diagonal", "block-tridiagonal"]
STRUCTURES = ("block-diagonal", "block-tridiagonal")


class KroneckerEngine(StatisticsMixin, ChainMixin):
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
        >>> from torch import nn
        >>> from curvlab.kfac import FactorCapture, find_layers
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
            due = [name for name, block in self.blocks.items()
                   if block.has_factors and (block.stale or block.eig is None)
                   and self.policy.inverse_due(step, name, block.factors(),
                                               name in self._updated)]
            names = self._refresh_blocks(due)
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
        return len(self._refresh_blocks([n for n in todo if self.blocks[n].has_factors and (
            names is not None or self.blocks[n].stale or self.blocks[n].eig is None)]))

    def _refresh_blocks(self, names: Sequence[str]) -> list[str]:
        """Refresh the named blocks, the same-size dense factors of all of them in one batched
        ``eigh`` per size; return the names whose decomposition was replaced."""
        blocks = [self.blocks[n] for n in names]
        inputs = [b.eigh_inputs() for b in blocks]
        flat = [pair for v in inputs if v is not None for pair in v]
        results = iter(safe_eigh_many([m for m, _ in flat], [nm for _, nm in flat]))
        done = []
        for name, block, inp in zip(names, blocks, inputs, strict=True):
            ok = block.refresh() if inp is None else block.refresh((next(results), next(results)))
            if ok:
                done.append(name)
        return done

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
