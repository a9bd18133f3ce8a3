r"""Kronecker-factored curvature state shared by :class:`~curvlab.optim.KFAC` and
:class:`~curvlab.optim.preconditioner.KFACPreconditioner` (private).

Conventions (spec ``kfac.md`` §0, matching ``curvlab``'s GGN scale):

* Layer ``s = W ā`` with ``ā = [a; 1]`` when the layer has a (selected) bias. Gradient in matrix
  form ``V = [∇W | ∇b]`` of shape ``out × (in + 1)`` (conv weights flattened to
  ``out × (C·kh·kw)``, the ``F.unfold`` order).
* ``A = (1/N) Σ_{n,t} ā_{nt} ā_{nt}ᵀ`` (mean over examples, sum over locations ``t``);
  ``G = (1/T) Σ_{n,t} g_{nt} g_{nt}ᵀ`` with ``g`` the back-propagated derivative of the
  *reduced* loss (so it already carries the loss scale ``c``, e.g. ``1/N`` for ``'mean'``); one
  term per Monte-Carlo sample (divided by the number of samples) or per square-root column
  (type-2). For the empirical Fisher the sum is multiplied by ``N`` (``'mean'`` reduction): the
  back-propagated derivative of a mean loss is ``g̃_n / N``. With these, ``A ⊗ G`` is exactly the
  GGN block whenever ``G_n`` is the same for all examples (e.g. any single layer of a deep linear
  network with squared error).
* In curvlab's flat order *inside the matrix* ``V`` (row-major) the block is ``G ⊗ A``:
  ``(G ⊗ A) vec_r(V) = vec_r(G V A)``.
* Factors are stored in float32 (float64 when the parameters are float64), computed with
  autocast disabled.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.kfac import (
    EighError,
    KFACLayer,
    KroneckerFactors,
    find_layers,
    input_factor,
    output_factor,
)
from curvlab.kfac import safe_eigh as _kfac_safe_eigh
from curvlab.kfac.tridiagonal import TridiagonalFactors, TridiagonalInverse

__all__ = ["KFACCurvature", "find_kfac_layers", "layer_factors"]


def safe_eigh(x: Tensor, what: str) -> tuple[Tensor, Tensor] | None:
    """:func:`curvlab.kfac.safe_eigh`, returning ``None`` after a warning on failure."""
    try:
        return _kfac_safe_eigh(x, name=what)
    except EighError as err:
        warnings.warn(f"K-FAC: {err}; keeping the previous inverse", RuntimeWarning,
                      stacklevel=4)
        return None


def find_kfac_layers(
    model: nn.Module, selected: Mapping[str, Tensor], *, strict: bool, who: str
) -> tuple[list[KFACLayer], list[str]]:
    """Supported layers (:func:`curvlab.kfac.find_layers`) and the names of all other selected
    parameters; one warning naming them (they get the plain gradient), or ``ValueError`` with
    ``strict=True``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = find_layers(model, dict(selected), strict=False)
    unsupported = [n for ps in table.unsupported.values() for n in ps]
    if unsupported:
        detail = "; ".join(f"{m or '<root>'} ({table.reasons.get(m, '?')}): {', '.join(ps)}"
                           for m, ps in table.unsupported.items())
        if strict:
            raise ValueError(f"{who}: K-FAC does not support these modules/parameters: {detail}"
                             "; exclude them with params= or pass strict=False")
        warnings.warn(f"{who}: no Kronecker-factored block for {detail}; these parameters get "
                      "the plain gradient (identity preconditioner)", UserWarning, stacklevel=3)
    return list(table.layers), unsupported


def _with_ones(layer: KFACLayer, x: Tensor) -> Tensor:
    if layer.bias is None:
        return x
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def layer_factors(
    layer: KFACLayer,
    inputs: Sequence[Tensor],
    out_grads: Sequence[Tensor],
    *,
    num_examples: int,
    fisher: str,
    reduction: str,
    mc_samples: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``A`` and ``G`` of one layer in ``dtype`` (see :mod:`curvlab.kfac.factors`)."""
    A = input_factor(layer, [x.to(dtype) for x in inputs])
    G = output_factor(layer, [g.to(dtype) for g in out_grads], num_examples, fisher=fisher,
                      reduction=reduction, mc_samples=mc_samples)
    return A, G


class KFACCurvature:
    r"""Per-layer Kronecker factors (EMA), their eigendecompositions, and preconditioning.

    ``inverse='eigen'``: :math:`(G \otimes A + \lambda I)^{-1}` exactly (Tikhonov on the
    product), ``Q_G[(Q_G^T V Q_A) ⊘ (d_G d_A^T + λ)]Q_A^T``. ``inverse='factored'``:
    π-adjusted factored Tikhonov :math:`(G + \tfrac{\sqrt\lambda}{\pi} I)^{-1} V (A + \pi
    \sqrt\lambda I)^{-1}`, :math:`\pi = \sqrt{(\operatorname{tr}A/\dim A)/(\operatorname{tr}G/
    \dim G)}` (1 when a trace is 0). ``ekfac=True`` replaces ``d_G d_A^T`` by the EKFAC scalings
    (second moments of per-example gradients in the Kronecker eigenbasis).
    """

    def __init__(self, layers: Sequence[KFACLayer], *, ema_decay: float, inverse: str,
                 ekfac: bool) -> None:
        if inverse not in ("eigen", "factored"):
            raise ValueError(f"inverse must be 'eigen' or 'factored', got {inverse!r}")
        if ekfac and inverse != "eigen":
            raise ValueError("ekfac=True needs inverse='eigen' (scalings live in the eigenbasis)")
        self.layers = list(layers)
        self.ema_decay = ema_decay
        self.inverse = inverse
        self.ekfac = ekfac
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # dA, QA, dG, QG
        self.scale: dict[str, Tensor] = {}  # EKFAC scalings (out x in)
        self.scale_new: dict[str, Tensor] = {}
        self.updates = 0  # number of EMA updates (k of the warm start)
        self.scale_updates = 0
        self.dirty = False
        self._explicit: dict[tuple[str, float], tuple[Tensor, Tensor]] = {}  # factored cache
        self.tridiagonal = False
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}  # chain: (A_{i,i+1}, G_{i,i+1})
        self.tri_snapshot: TridiagonalFactors | None = None  # factors at the last refresh
        self._tri: dict[float, TridiagonalInverse] = {}

    # ---- statistics --------------------------------------------------------------------
    def ema_weight(self) -> float:
        """``ε_k = min(1 − 1/k, ema_decay)`` for the next update (k counts updates)."""
        k = self.updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    def update(self, new_A: Mapping[str, Tensor], new_G: Mapping[str, Tensor],
               new_cross: Mapping[int, tuple[Tensor, Tensor]] | None = None) -> None:
        """EMA update of the factors (and of the cross-layer factors of a chain)."""
        eps = self.ema_weight()
        for i, (ca, cg) in (new_cross or {}).items():
            if i in self.cross and eps > 0.0:
                oa, og = self.cross[i]
                self.cross[i] = (eps * oa + (1.0 - eps) * ca, eps * og + (1.0 - eps) * cg)
            else:
                self.cross[i] = (ca.clone(), cg.clone())
        for name, a in new_A.items():
            g = new_G[name]
            if name in self.A and eps > 0.0:
                self.A[name] = eps * self.A[name] + (1.0 - eps) * a
                self.G[name] = eps * self.G[name] + (1.0 - eps) * g
            else:
                self.A[name], self.G[name] = a.clone(), g.clone()
            self.A[name] = 0.5 * (self.A[name] + self.A[name].mT)
            self.G[name] = 0.5 * (self.G[name] + self.G[name].mT)
        self.updates += 1
        self.dirty = True

    def update_scale(self, new_scale: Mapping[str, Tensor]) -> None:
        """EMA of the EKFAC scalings (same warm start, its own counter via ``scale_updates``)."""
        eps = self.ema_weight_scale()
        for name, s in new_scale.items():
            if name in self.scale and eps > 0.0:
                self.scale[name] = eps * self.scale[name] + (1.0 - eps) * s
            else:
                self.scale[name] = s.clone()
        self.scale_updates += 1

    def ema_weight_scale(self) -> float:
        k = self.scale_updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    # ---- inverses ----------------------------------------------------------------------
    def refresh(self, damping: float | None = None) -> None:
        """Recompute the eigendecompositions of all factors (failures keep the last good one);
        with ``inverse='factored'`` and a ``damping``, also the explicit damped inverses."""
        self._explicit.clear()
        if self.tridiagonal and all(layer.name in self.A for layer in self.layers) \
                and len(self.cross) == len(self.layers) - 1:
            self._tri.clear()
            self.tri_snapshot = TridiagonalFactors(
                [KroneckerFactors(self.A[la.name].clone(), self.G[la.name].clone(), 0)
                 for la in self.layers],
                [self.cross[i][0].clone() for i in range(len(self.layers) - 1)],
                [self.cross[i][1].clone() for i in range(len(self.layers) - 1)],
            )
        for layer in self.layers:
            name = layer.name
            if name not in self.A:
                continue
            ea = safe_eigh(self.A[name], f"A of {name!r}")
            eg = safe_eigh(self.G[name], f"G of {name!r}")
            if ea is None or eg is None:
                continue
            self.eig[name] = (ea[0], ea[1], eg[0], eg[1])
            if self.ekfac:
                # new basis: restart the scalings from the K-FAC eigenvalues
                self.scale[name] = torch.outer(eg[0], ea[0])
                self.scale_updates = 0
        self.dirty = False
        if damping is not None and self.inverse == "factored":
            for layer in self.layers:
                if layer.name in self.eig:
                    self._explicit_inverses(layer, damping)

    def _explicit_inverses(self, layer: KFACLayer, damping: float) -> tuple[Tensor, Tensor]:
        key = (layer.name, damping)
        if key not in self._explicit:
            dA, QA, dG, QG = self.eig[layer.name]
            ta, tg = float(dA.sum()) / dA.numel(), float(dG.sum()) / dG.numel()
            pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
            root = math.sqrt(damping)
            if len(self._explicit) > 4 * max(1, len(self.layers)):
                self._explicit.clear()
            self._explicit[key] = ((QG / (dG + root / pi)) @ QG.mT,
                                   (QA / (dA + pi * root)) @ QA.mT)
        return self._explicit[key]

    def precondition(self, layer: KFACLayer, v: Tensor, damping: float) -> Tensor:
        """Apply the damped inverse block to ``V`` (matrix form, any float dtype)."""
        dA, QA, dG, QG = self.eig[layer.name]
        vf = v.to(QA.dtype)
        if self.inverse == "eigen":
            denom = self.scale[layer.name] if self.ekfac else torch.outer(dG, dA)
            out = QG @ ((QG.mT @ vf @ QA) / (denom + damping)) @ QA.mT
        else:
            g_inv, a_inv = self._explicit_inverses(layer, damping)
            out = g_inv @ vf @ a_inv
        return out.to(v.dtype)

    def ekfac_scale(self, layer: KFACLayer, inputs: Sequence[Tensor], grads: Tensor,
                    weight: float) -> Tensor | None:
        r"""EKFAC scalings ``S_{ij} = w Σ_n (Q_G^T D_n Q_A)_{ij}^2`` of one back-propagated pass,
        from per-example gradients ``D_n = Σ_t g_{nt} ā_{nt}^T`` (``w``: the Fisher scale).

        ``inputs``: expanded inputs ``(N, T, fan_in)`` (pooled over calls); ``grads``: output
        derivatives ``(N, T, out)`` of that pass.
        """
        if layer.name not in self.eig:
            return None
        _, QA, _, QG = self.eig[layer.name]
        x = torch.cat([_with_ones(layer, t.to(QA.dtype)) for t in inputs])
        a = x @ QA
        g = grads.to(QG.dtype) @ QG
        if a.shape[1] == 1:
            return weight * (g[:, 0].square().mT @ a[:, 0].square())
        d = torch.einsum("nto,nti->noi", g, a)
        return weight * d.square().sum(0)

    # ---- state ----------------------------------------------------------------------------
    def tridiagonal_apply(self, vs: Sequence[Tensor], damping: float) -> list[Tensor] | None:
        """Block-tridiagonal inverse (Martens & Grosse's ``Ξᵀ Λ Ξ``, factored damping) of the
        chain at the last refresh; ``None`` if unavailable (e.g. singular, warned)."""
        if self.tri_snapshot is None:
            return None
        if damping not in self._tri:
            try:
                inv = TridiagonalInverse(self.tri_snapshot, damping)
            except (EighError, ValueError) as err:
                warnings.warn(f"K-FAC: block-tridiagonal inverse failed ({err}); using the "
                              "block-diagonal inverse", RuntimeWarning, stacklevel=4)
                return None
            if len(self._tri) > 4:
                self._tri.clear()
            self._tri[damping] = inv
        inv = self._tri[damping]
        dtype = inv.inv_A[0].dtype
        return [u.to(v.dtype) for u, v in zip(inv.apply([v.to(dtype) for v in vs]), vs)]

    def memory_bytes(self) -> dict[str, int]:
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        factors = size(list(self.A.values()) + list(self.G.values())
                       + [t for c in self.cross.values() for t in c])
        inverses = size([t for e in self.eig.values() for t in e]) + size(self.scale.values())
        return {"factors": factors, "inverses": inverses, "total": factors + inverses}

    def state_dict(self) -> dict[str, Any]:
        return {
            "A": {k: v.clone() for k, v in self.A.items()},
            "G": {k: v.clone() for k, v in self.G.items()},
            "eig": {k: tuple(t.clone() for t in v) for k, v in self.eig.items()},
            "scale": {k: v.clone() for k, v in self.scale.items()},
            "updates": self.updates,
            "scale_updates": self.scale_updates,
            "dirty": self.dirty,
            "cross": {k: tuple(t.clone() for t in v) for k, v in self.cross.items()},
            "tri_snapshot": None if self.tri_snapshot is None else copy.deepcopy(self.tri_snapshot),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = {layer.name for layer in self.layers}
        unknown = set(state["A"]) - names
        if unknown:
            raise ValueError(f"K-FAC state has factors for unknown layers {sorted(unknown)}; "
                             f"this optimizer's layers are {sorted(names)}")
        self.A = {k: v.clone() for k, v in state["A"].items()}
        self.G = {k: v.clone() for k, v in state["G"].items()}
        self.eig = {k: tuple(t.clone() for t in v) for k, v in state["eig"].items()}
        self.scale = {k: v.clone() for k, v in state["scale"].items()}
        self.updates = int(state["updates"])
        self.scale_updates = int(state["scale_updates"])
        self.dirty = bool(state["dirty"])
        self._explicit.clear()
        self.cross = {int(k): tuple(t.clone() for t in v) for k, v in state["cross"].items()}
        snap = state["tri_snapshot"]
        self.tri_snapshot = None if snap is None else copy.deepcopy(snap)
        self._tri.clear()


def precondition_grads(
    curv: KFACCurvature,
    names: Sequence[str],
    grads: Sequence[Tensor],
    damping: float,
) -> tuple[list[Tensor], set[int]]:
    """``F̆⁻¹ g`` per layer for gradients listed in the order of ``names``; parameters of
    unsupported modules and of layers without an inverse yet keep their gradient. Also returns
    the indices that were preconditioned."""
    index = {n: i for i, n in enumerate(names)}
    out = list(grads)
    done: set[int] = set()
    if not grads:
        return out, done
    with torch.autocast(device_type=grads[0].device.type, enabled=False):
        for layer in curv.layers:
            if layer.name not in curv.eig or layer.weight not in index:
                continue
            iw = index[layer.weight]
            ib = index.get(layer.bias) if layer.bias is not None else None
            v = layer.to_matrix(grads[iw], None if ib is None else grads[ib])
            uw, ub = layer.from_matrix(curv.precondition(layer, v, damping))
            out[iw] = uw.reshape(grads[iw].shape)
            done.add(iw)
            if ib is not None:
                out[ib] = ub
                done.add(ib)
    return out, done
