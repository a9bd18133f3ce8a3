r"""K-FAC as a linear operator: Kronecker-factored approximation of the GGN / Fisher.

:class:`KFAC` estimates, once at construction, the Kronecker factors of every supported layer
(:mod:`curvlab.kfac`) over ``data`` and acts as the approximate curvature matrix in curvlab's flat
order (the selected parameters in ``model.parameters()`` order, each row-major), i.e. the same
indexing as :class:`curvlab.GGN` on the same model and ``params``.

Which matrix, at which scale. ``fisher="type2"`` approximates ``curvlab.GGN`` (= the true
Fisher for cross-entropy, MSE, BCE-with-logits), ``"mc"`` the Monte-Carlo ``curvlab.Fisher``,
``"empirical"`` ``curvlab.EmpiricalFisher``, each *at the same scale* (loss reduction
included; see :mod:`curvlab.kfac.factors`). Per layer, in the row-major order of the homogeneous
matrix ``[W.reshape(out, -1) | b]``, the block is ``G ⊗ A`` (the papers' ``A ⊗ G`` for
column-major vec); curvlab's flat order lists the weight block, then the bias (a fixed
permutation handled internally).

The factors live in the one Kronecker engine (:class:`curvlab.kfac.KroneckerEngine`, attribute
``engine``) that also serves the K-FAC optimizer and :class:`curvlab.KFACPreconditioner`, so
every option means the same there. A layer called several times in one forward (shared
weights) gets K-FAC-expand statistics over its calls (:mod:`curvlab.kfac.capture`).

Structures: ``"block-diagonal"`` (K-FAC / KFC); ``"block-tridiagonal"`` (Martens & Grosse §4.3:
``@`` applies the block-tridiagonal Kronecker matrix ``F̃``, with cross-layer blocks
``G_{i,i+1} ⊗ A_{i,i+1}``; chains of ``nn.Linear`` only); ``ekfac=True`` replaces the Kronecker
eigenvalues by EKFAC's per-example second moments in the Kronecker eigenbasis.

Normalization layers (BatchNorm, LayerNorm, GroupNorm) get SP-NGD's unit-wise ``2 × 2`` blocks
over ``(γ_c, β_c)`` (:mod:`curvlab.kfac.unitwise`; attribute ``unit_factors``).

Grouped convolutions are block-diagonal over groups (one Kronecker product per group, see
:mod:`curvlab.kfac.layers`). Unsupported parameters (BatchNorm, LayerNorm, ... among the selected
ones): the
operator is **zero** on their rows/columns, and :meth:`KFAC.inverse` acts on them as
``(1/damping) I``: the preconditioned step for those parameters is the plain gradient divided by
the damping (the damped inverse of a zero block). A warning names them; ``strict=True`` raises.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvlab.func.losses import LossFn, loss_rule
from curvlab.func.params import ParamsArg, select_params
from curvlab.kfac.blocks import KroneckerBlock
from curvlab.kfac.ekfac import EKFACFactors, ekfac_factors
from curvlab.kfac.engine import KroneckerEngine, register_layers
from curvlab.kfac.factors import (
    FisherType,
    KroneckerFactors,
    accumulate_factors,
    capture_statistics,
    kfac_factors,
)
from curvlab.kfac.layers import KFACLayer, LayerTable
from curvlab.kfac.tridiagonal import (
    TridiagonalFactors,
    TridiagonalInverse,
    accumulate_tridiagonal,
    tridiagonal_factors,
)
from curvlab.kfac.unitwise import unit_fisher
from curvlab.operators.base import LinearOperator, unflatten
from curvlab.operators.curvature import _to_device, as_batches

__all__ = ["KFAC", "KFACInverse"]

Structure = Literal["block-diagonal", "block-tridiagonal"]


class _LayerLayout:
    """Maps between curvlab's flat parameter blocks and per-layer matrices: homogeneous
    ``(K, out, in)`` for Kronecker blocks, ``(K, U, d)`` for unit-wise blocks."""

    def __init__(self, names: list[str], table: LayerTable) -> None:
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.layers = table.layers
        self.norm = list(table.norm)
        registered = set(table.param_names) | {n for la in self.norm for n in la.param_names}
        self.free = [i for i, n in enumerate(names) if n not in registered]

    def to_matrices(self, cols: list[Tensor]) -> dict[str, Tensor]:
        """Parameter-form columns ``(*shape, K)`` -> ``{layer: per-layer matrices}``."""
        mats = {}
        for layer in self.layers:
            w = cols[self.index[layer.weight]].movedim(-1, 0)
            b = cols[self.index[layer.bias]].movedim(-1, 0) if layer.bias is not None else None
            mats[layer.name] = layer.to_matrix(w, b)
        for layer in self.norm:
            mats[layer.name] = KroneckerEngine.unit_matrix(
                layer, {n: cols[self.index[n]].movedim(-1, 0) for n in layer.param_names})
        return mats

    def from_matrices(self, mats: dict[str, Tensor], like: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(c) for c in like]
        for layer in self.layers:
            w, b = layer.from_matrix(mats[layer.name])
            out[self.index[layer.weight]][layer.out_slice] = w.movedim(0, -1)
            if layer.bias is not None:
                out[self.index[layer.bias]][layer.out_slice] = b.movedim(0, -1)
        for layer in self.norm:
            shapes = {n: like[self.index[n]].movedim(-1, 0) for n in layer.param_names}
            for n, t in KroneckerEngine.unit_params(layer, mats[layer.name], shapes).items():
                out[self.index[n]] = t.movedim(0, -1)
        return out


def _make_generator(generator: int | torch.Generator | None, device: torch.device):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got "
                    f"{type(generator).__name__}")


class KFAC(LinearOperator):
    r"""Kronecker-factored approximate curvature of ``loss_fn`` over ``data``.

    Args:
        model: The network (never modified: buffers cloned, ``.grad`` untouched).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``,
            reduction ``'mean'`` or ``'sum'``.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches; factors of several
            batches are combined as for one concatenated batch
            (:func:`curvlab.kfac.factors.accumulate_factors`).
        fisher: ``"type2"`` (≈ ``curvlab.GGN``), ``"mc"`` (≈ ``curvlab.Fisher``) or
            ``"empirical"`` (≈ ``curvlab.EmpiricalFisher``).
        params: Parameter selection (default: all trainable), as for ``curvlab.GGN``.
        mc_samples: Samples per example for ``"mc"``.
        generator: ``int`` seed or ``torch.Generator`` for ``"mc"``.
        structure: ``"block-diagonal"`` or ``"block-tridiagonal"``.
        ekfac: Use EKFAC scalings (block-diagonal only).
        strict: Raise instead of warning about unsupported parameters.
        split_dim: THOR's block splitting: factors larger than ``split_dim`` are replaced by
            their block-diagonal parts (blocks of at most ``split_dim``), so the operator and
            ``to_dense()`` are ``blockdiag(G) ⊗ blockdiag(A)`` per layer.
        unitwise: Unit-wise blocks for BatchNorm/LayerNorm/GroupNorm affine parameters
            (default); ``False`` treats them as unsupported.
        kfac_approx: ``'expand'`` (default) or ``'reduce'`` (Eschenhagen et al. 2023) for
            layers applied at several positions (:func:`curvlab.kfac.factors.reduce_shared`).

    Attributes:
        layers: The :class:`~curvlab.kfac.layers.LayerTable`.
        factors: ``{layer name: KroneckerFactors}``.
        ekfac_factors: ``{layer name: EKFACFactors}`` when ``ekfac=True``.
        tridiagonal: :class:`~curvlab.kfac.tridiagonal.TridiagonalFactors` for the tridiagonal
            structure.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> K = KFAC(net, nn.CrossEntropyLoss(), data)
        >>> K.shape, sorted(K.factors)
        ((26, 26), ['0', '2'])
        >>> v = torch.randn(26)
        >>> inv = K.inverse(damping=1e-2)
        >>> torch.allclose(K @ (inv @ v) + 1e-2 * (inv @ v), v, atol=1e-4)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        fisher: FisherType = "type2",
        params: ParamsArg = None,
        *,
        mc_samples: int = 1,
        generator: int | torch.Generator | None = None,
        structure: Structure = "block-diagonal",
        ekfac: bool = False,
        strict: bool = False,
        split_dim: int | None = None,
        unitwise: bool = True,
        kfac_approx: str = "expand",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if fisher not in ("type2", "mc", "empirical"):
            raise ValueError(f"fisher must be 'type2', 'mc' or 'empirical', got {fisher!r}")
        if structure not in ("block-diagonal", "block-tridiagonal"):
            raise ValueError(f"structure must be 'block-diagonal' or 'block-tridiagonal', got "
                             f"{structure!r}")
        if ekfac and structure != "block-diagonal":
            raise ValueError("ekfac=True needs structure='block-diagonal'")
        selected = select_params(model, params)
        first = next(iter(selected.values()))
        for name, p in selected.items():
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(f"parameter {name!r} is {p.dtype} on {p.device}, the first is "
                                f"{first.dtype} on {first.device}; one dtype/device needed")
        self.layers = register_layers(model, list(selected), strict=strict, who="KFAC",
                                      fallback="the operator is zero on them",
                                      unitwise=unitwise)
        self.rule = loss_rule(loss_fn)
        if self.rule.reduction not in ("mean", "sum"):
            raise ValueError(f"{self.rule.name}: K-FAC needs reduction 'mean' or 'sum'")
        self.model, self.loss_fn, self.fisher, self.structure = model, loss_fn, fisher, structure
        self.mc_samples = int(mc_samples)
        self.ekfac = bool(ekfac)
        names = list(selected)
        super().__init__((sum(p.numel() for p in selected.values()),) * 2, first.dtype,
                         first.device, param_shapes=[p.shape for p in selected.values()],
                         param_names=names, symmetric=True)
        self._layout = _LayerLayout(names, self.layers)
        #: The Kronecker engine holding the factors (shared with the optimizer and the
        #: preconditioner: the same blocks, inverses and options).
        self.engine = KroneckerEngine(self.layers, fisher=fisher, reduction=self.rule.reduction,
                                      mc_samples=self.mc_samples, ekfac=ekfac,
                                      structure=structure, split_dim=split_dim,
                                      kfac_approx=kfac_approx)
        gen = _make_generator(generator, first.device)
        kw = {"fisher": fisher, "mc_samples": self.mc_samples, "generator": gen}
        self.kfac_approx = kfac_approx
        batches = []
        for i, batch in enumerate(as_batches(data)):
            if not isinstance(batch, tuple | list) or len(batch) != 2:
                raise TypeError(f"data batch {i} must be an (inputs, targets) pair")
            batches.append((_to_device(batch[0], self.device), _to_device(batch[1], self.device)))
        if not batches:
            raise ValueError("data is empty: K-FAC needs at least one (inputs, targets) batch")
        self.tridiagonal: TridiagonalFactors | None = None
        self.ekfac_factors: dict[str, EKFACFactors] | None = None
        red = self.rule.reduction
        if structure == "block-tridiagonal":
            self.tridiagonal = accumulate_tridiagonal(
                [tridiagonal_factors(model, loss_fn, x, y, self.layers, **kw) for x, y in batches],
                red)
            self.factors: dict[str, KroneckerFactors] = {
                layer.name: f for layer, f in zip(self.layers, self.tridiagonal.diag, strict=True)}
        else:
            self.factors = accumulate_factors(
                [kfac_factors(model, loss_fn, x, y, self.layers, kfac_approx=kfac_approx, **kw)
                 for x, y in batches], red)
        self.engine.set_factors(self.factors, self.tridiagonal)
        #: ``{norm layer name: (U, d, d)}`` unit-wise Fisher blocks.
        self.unit_factors: dict[str, Tensor] = {}
        if self.layers.norm:
            self.unit_factors = self._unit_factors(batches, kw)
            self.engine.set_factors(self.unit_factors)
        if ekfac:
            self.engine.refresh()
            bases = {la.name: (self.engine.blocks[la.name].eig.eigenvectors_A,
                               self.engine.blocks[la.name].eig.eigenvectors_G)
                     for la in self.layers if la.kind != "embedding"}
            per = [ekfac_factors(model, loss_fn, x, y, self.layers, bases=bases, **kw)
                   for x, y in batches]
            total = sum(p[next(iter(p))].num_examples for p in per)
            self.ekfac_factors = {}
            for n, (u_a, u_g) in bases.items():
                if red == "mean":
                    s = sum(p[n].scalings * (p[n].num_examples / total) for p in per)
                else:
                    s = sum(p[n].scalings for p in per)
                self.ekfac_factors[n] = EKFACFactors(u_a, u_g, s, total)
                self.engine.blocks[n].set_scalings(s)

    def _unit_factors(self, batches, kw) -> dict[str, Tensor]:
        """Unit-wise Fisher blocks of the normalization layers over ``batches`` (combined as
        for one concatenated batch, like ``G``)."""
        per, counts = [], []
        for x, y in batches:
            cap, n, rule = capture_statistics(self.model, self.loss_fn, x, y, self.layers.norm,
                                              **kw)
            per.append({la.name: unit_fisher(la, cap.layer_inputs(la.name),
                                             cap.layer_output_grads(la.name), n,
                                             fisher=self.fisher, reduction=rule.reduction,
                                             mc_samples=self.mc_samples)
                        for la in self.layers.norm})
            counts.append(n)
        total = sum(counts)
        mean = self.rule.reduction == "mean"
        return {name: sum(p[name] * (c / total if mean else 1.0)
                          for p, c in zip(per, counts, strict=True)) for name in per[0]}

    @property
    def unsupported(self) -> dict[str, list[str]]:
        """``{module name: [parameter names]}`` the operator treats as zero."""
        return self.layers.unsupported

    def _layer_products(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.engine.multiply(mats, power=1)

    def _matmat(self, M: Tensor) -> Tensor:
        cols = unflatten(M, self.param_shapes)
        mats = self._layout.to_matrices(cols)
        out = self._layout.from_matrices(self._layer_products(mats), cols)
        return torch.cat([c.reshape(-1, M.shape[1]) for c in out], 0)

    def inverse(
        self, damping: float, method: Literal["eigen", "factored", "cholesky"] = "eigen", *,
        pi: str | float = "tracenorm",
    ) -> KFACInverse:
        """Damped inverse as an operator (see :class:`KFACInverse` for the damping semantics).

        ``method="eigen"``: ``(K + λ I)⁻¹`` exactly per block (EKFAC: with its scalings);
        ``method="factored"``: π-split factored Tikhonov per block; for
        ``structure="block-tridiagonal"`` only ``"factored"`` (Martens & Grosse) exists.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2))
            >>> K = KFAC(net, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 2)))
            >>> K.inverse(0.1, method="factored").shape
            (6, 6)
        """
        return KFACInverse(self, damping, method, pi=pi)

    def _repr_extra(self) -> str:
        return (f"fisher={self.fisher!r}, structure={self.structure!r}, ekfac={self.ekfac}, "
                f"layers={[layer.name for layer in self.layers]}")


class KFACInverse(LinearOperator):
    r"""Damped inverse of a :class:`KFAC` operator.

    * ``method="eigen"`` (block-diagonal): per layer ``(G ⊗ A + λ I)⁻¹`` via eigenbases — exact
      Tikhonov on the Kronecker product; with ``ekfac=True`` ``(U diag(S*) Uᵀ + λ I)⁻¹``. This
      is exactly ``(K + λ I)⁻¹`` for the operator ``K``.
    * ``method="factored"``: per layer ``(G + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹`` (trace-norm π, spec
      §1.4); for the tridiagonal structure Martens & Grosse's ``F̂⁻¹`` with this damping on the
      diagonal blocks only.
    * Unsupported parameters: ``(1/λ) I`` (the damped inverse of their zero block).

    Attributes:
        blocks: ``{layer name: KroneckerBlock}`` of the engine (block-diagonal), and
            ``tridiagonal``: the :class:`~curvlab.kfac.tridiagonal.TridiagonalInverse` of the
            block-tridiagonal structure.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> K = KFAC(net, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 2)))
        >>> inv = K.inverse(0.5)
        >>> v = torch.randn(6)
        >>> torch.allclose((K @ (inv @ v)) + 0.5 * (inv @ v), v, atol=1e-5)
        True
    """

    def __init__(self, kfac: KFAC, damping: float, method: str = "eigen", *,
                 pi: str | float = "tracenorm") -> None:
        if not isinstance(damping, int | float) or isinstance(damping, bool):
            raise TypeError(f"damping must be a number, got {type(damping).__name__}")
        if method not in ("eigen", "factored", "cholesky"):
            raise ValueError(f"method must be 'eigen', 'factored' or 'cholesky', got {method!r}")
        if damping <= 0 and (kfac._layout.free or method != "eigen"):
            raise ValueError(f"damping must be > 0 (got {damping}): unsupported parameters or "
                             "method='factored' need it")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if kfac.tridiagonal is not None and method != "factored":
            raise ValueError("structure='block-tridiagonal' has only method='factored' "
                             "(Martens & Grosse's damped inverse)")
        if kfac.ekfac_factors is not None and method != "eigen":
            raise ValueError("ekfac=True needs method='eigen' (scalings live in the eigenbasis)")
        super().__init__(kfac.shape, kfac.dtype, kfac.device, param_shapes=kfac.param_shapes,
                         param_names=kfac.param_names, symmetric=True)
        self.kfac, self.damping, self.method = kfac, float(damping), method
        self._layout = kfac._layout
        engine = kfac.engine
        if pi != engine.pi:
            engine = copy.copy(engine)  # same factors, another π
            engine.pi = pi
            engine.blocks = {n: copy.copy(b) for n, b in kfac.engine.blocks.items()}
            for b in engine.blocks.values():
                b.pi, b._explicit = pi, {}
            engine._chain_inverses = {}
        if not engine.ready or engine.stale:
            engine.refresh()
        self._engine = engine
        #: ``{layer name: KroneckerBlock}`` whose damped inverse this operator applies.
        self.blocks: dict[str, KroneckerBlock] = dict(engine.blocks)
        self.tridiagonal: TridiagonalInverse | None = None
        if kfac.tridiagonal is not None:
            self.tridiagonal = engine.chain_inverse(self.damping)
            if self.tridiagonal is None:
                raise ValueError("KFAC.inverse: the block-tridiagonal inverse failed (warned)")

    @property
    def layers(self) -> Sequence[KFACLayer]:
        return self._layout.layers

    def _matmat(self, M: Tensor) -> Tensor:
        cols = unflatten(M, self.param_shapes)
        mats = self._layout.to_matrices(cols)
        res = self._engine.multiply(mats, -1, self.damping,
                                    inverse=self.method if self.tridiagonal is None else None)
        out = self._layout.from_matrices(res, cols)
        for i in self._layout.free:
            out[i] = cols[i] / self.damping
        return torch.cat([c.reshape(-1, M.shape[1]) for c in out], 0)

    def _repr_extra(self) -> str:
        return f"damping={self.damping}, method={self.method!r}"
