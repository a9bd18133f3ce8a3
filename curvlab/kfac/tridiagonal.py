r"""Block-tridiagonal K-FAC for a chain of Linear layers (Martens & Grosse 2015, §4.3 / spec §1.9).

Layers ``1..ℓ`` in registration order with gradient matrices ``V_i = [∇W_i | ∇b_i]``. In
curvlab's row-major order of each ``V_i`` the K-FAC blocks are

* diagonal ``F_ii = G_i ⊗ A_i`` (damped: ``Ĝ_i ⊗ Â_i`` with the π-split factored Tikhonov of
  :class:`~curvlab.kfac.inverse.FactoredInverse`),
* off-diagonal ``F_{i,i+1} = G_{i,i+1} ⊗ A_{i,i+1}`` with the cross-layer statistics
  ``A_{i,i+1} = (1/N) Σ_n ā_i ā_{i+1}ᵀ`` and ``G_{i,i+1} = s Σ_k Σ_n δ_{i} δ_{i+1}ᵀ`` (undamped).

The block-tridiagonal matrix ``F̃`` built from these blocks is applied by
:meth:`TridiagonalFactors.mv`. Its approximate inverse is Martens & Grosse's: ``F̂`` is the
covariance of the Gaussian chain ``w_ℓ ~ N(0, F_ℓℓ)``, ``w_i = Ψ_{i,i+1} w_{i+1} + ε_i`` with
``Ψ_{i,i+1} = F_{i,i+1} F_{i+1,i+1}⁻¹ = (G_{i,i+1}Ĝ_{i+1}⁻¹) ⊗ (A_{i,i+1}Â_{i+1}⁻¹)``, so ``F̂``
equals (damped) ``F̃`` on the tridiagonal band and ``F̂⁻¹ = Ξᵀ Λ Ξ`` is block-tridiagonal
(``Ξ``: identity diagonal, ``-Ψ_{i,i+1}`` above it; ``Λ = diag(Σ_{i|i+1}⁻¹)``). The conditional
covariances ``Σ_{i|i+1} = Ĝ_i⊗Â_i − X_G⊗X_A`` (``X_G = G_{i,i+1}Ĝ_{i+1}⁻¹G_{i,i+1}ᵀ``) are inverted
exactly by simultaneous diagonalization, eigenvalues clipped to ``[0, 1]`` as in Martens' code.
No maintained K-FAC library implements this variant (spec §1.9).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import LossFn
from curvlab.kfac.factors import (
    FisherType,
    KroneckerFactors,
    _layer_list,
    accumulate_factors,
    capture_statistics,
    cross_input_factor,
    cross_output_factor,
    input_factor,
    output_factor,
)
from curvlab.kfac.inverse import pi_tracenorm, safe_eigh
from curvlab.kfac.layers import KFACLayer, LayerTable

__all__ = [
    "TridiagonalFactors",
    "TridiagonalInverse",
    "accumulate_tridiagonal",
    "tridiagonal_factors",
]


@dataclass
class TridiagonalFactors:
    """Diagonal and consecutive cross-layer Kronecker factors of a chain of layers.

    Attributes:
        diag: ``ℓ`` :class:`~curvlab.kfac.factors.KroneckerFactors` (``A_i``, ``G_i``).
        cross_A: ``ℓ-1`` matrices ``A_{i,i+1}`` of shape ``(in_i, in_{i+1})``.
        cross_G: ``ℓ-1`` matrices ``G_{i,i+1}`` of shape ``(out_i, out_{i+1})``.

    Example:
        >>> f = KroneckerFactors(torch.eye(2), torch.eye(1), 1)
        >>> t = TridiagonalFactors([f, f], [0.5 * torch.eye(2)], [torch.ones(1, 1)])
        >>> t.mv([torch.ones(1, 2), torch.zeros(1, 2)])
        [tensor([[1., 1.]]), tensor([[0.5000, 0.5000]])]
    """

    diag: list[KroneckerFactors]
    cross_A: list[Tensor]
    cross_G: list[Tensor]

    def __post_init__(self) -> None:
        n = len(self.diag)
        if len(self.cross_A) != n - 1 or len(self.cross_G) != n - 1:
            raise ValueError(f"a chain of {n} layers needs {n - 1} cross factors, got "
                             f"{len(self.cross_A)} (A) and {len(self.cross_G)} (G)")
        for i, (ca, cg) in enumerate(zip(self.cross_A, self.cross_G, strict=True)):
            if ca.shape != (self.diag[i].A.shape[0], self.diag[i + 1].A.shape[0]):
                raise ValueError(f"cross_A[{i}] has shape {tuple(ca.shape)}")
            if cg.shape != (self.diag[i].G.shape[0], self.diag[i + 1].G.shape[0]):
                raise ValueError(f"cross_G[{i}] has shape {tuple(cg.shape)}")

    def mv(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """Block-tridiagonal ``F̃`` times the gradient matrices ``V_i`` (``(..., out_i, in_i)``)."""
        out = [f.G @ v @ f.A for f, v in zip(self.diag, vs, strict=True)]
        for i, (ca, cg) in enumerate(zip(self.cross_A, self.cross_G, strict=True)):
            out[i] = out[i] + cg @ vs[i + 1] @ ca.T
            out[i + 1] = out[i + 1] + cg.T @ vs[i] @ ca
        return out

    def dense(self) -> Tensor:
        """Dense ``F̃`` in the row-major order of ``V_1, …, V_ℓ`` (small chains; for tests)."""
        sizes = [f.G.shape[0] * f.A.shape[0] for f in self.diag]
        ref = self.diag[0].A
        mat = torch.zeros(sum(sizes), sum(sizes), dtype=ref.dtype, device=ref.device)
        off = [0, *list(torch.tensor(sizes).cumsum(0).tolist())]
        for i, f in enumerate(self.diag):
            mat[off[i]:off[i + 1], off[i]:off[i + 1]] = torch.kron(f.G, f.A)
        for i, (ca, cg) in enumerate(zip(self.cross_A, self.cross_G, strict=True)):
            b = torch.kron(cg, ca)
            mat[off[i]:off[i + 1], off[i + 1]:off[i + 2]] = b
            mat[off[i + 1]:off[i + 2], off[i]:off[i + 1]] = b.T
        return mat


def _inv_sqrt(m: Tensor, name: str) -> tuple[Tensor, Tensor]:
    d, u = safe_eigh(m, name=name)
    if bool((d <= 0).any()):
        raise ValueError(f"{name} is singular; use damping > 0")
    return (u / d.sqrt()) @ u.T, (u / d) @ u.T


class TridiagonalInverse:
    """Martens & Grosse's block-tridiagonal inverse ``F̂⁻¹ = Ξᵀ Λ Ξ`` (see the module docstring).

    Args:
        factors: :class:`TridiagonalFactors` of the chain.
        damping: ``γ`` of the factored Tikhonov damping on the *diagonal* blocks
            (``Â_i = A_i + π_i√γ I``, ``Ĝ_i = G_i + √γ/π_i I``); cross blocks are undamped.
        pi: ``"tracenorm"`` or a positive float (as in
            :class:`~curvlab.kfac.inverse.FactoredInverse`).

    Example:
        >>> f = KroneckerFactors(torch.eye(2), torch.eye(1), 1)
        >>> t = TridiagonalFactors([f, f], [torch.zeros(2, 2)], [torch.zeros(1, 1)])
        >>> TridiagonalInverse(t, damping=1.0).apply([torch.ones(1, 2), torch.ones(1, 2)])
        [tensor([[0.2500, 0.2500]]), tensor([[0.2500, 0.2500]])]
    """

    def __init__(self, factors: TridiagonalFactors, damping: float, *,
                 pi: str | float = "tracenorm") -> None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.damping = float(damping)
        root = math.sqrt(self.damping)
        a_hat, g_hat, self.pis = [], [], []
        for i, f in enumerate(factors.diag):
            p = pi_tracenorm(f.A, f.G) if pi == "tracenorm" else float(pi)
            if p <= 0:
                raise ValueError(f"pi must be 'tracenorm' or positive, got {pi!r}")
            self.pis.append(p)
            a_hat.append(f.A + p * root * torch.eye(f.A.shape[0], dtype=f.A.dtype,
                                                    device=f.A.device))
            g_hat.append(f.G + root / p * torch.eye(f.G.shape[0], dtype=f.G.dtype,
                                                    device=f.G.device))
            del i
        self.A_damped, self.G_damped = a_hat, g_hat
        inv_a, inv_g, isq_a, isq_g = [], [], [], []
        for i, (a, g) in enumerate(zip(a_hat, g_hat, strict=True)):
            sa, ia = _inv_sqrt(a, f"damped A of chain layer {i}")
            sg, ig = _inv_sqrt(g, f"damped G of chain layer {i}")
            isq_a.append(sa)
            isq_g.append(sg)
            inv_a.append(ia)
            inv_g.append(ig)
        self.inv_A, self.inv_G = inv_a, inv_g
        # Ψ^A_i = A_{i,i+1} Â_{i+1}^{-1}, Ψ^G_i = G_{i,i+1} Ĝ_{i+1}^{-1}
        self.psi_A = [ca @ inv_a[i + 1] for i, ca in enumerate(factors.cross_A)]
        self.psi_G = [cg @ inv_g[i + 1] for i, cg in enumerate(factors.cross_G)]
        self.K_A, self.K_G, self.denom = [], [], []
        for i in range(len(factors.diag) - 1):
            x_a = self.psi_A[i] @ factors.cross_A[i].T
            x_g = self.psi_G[i] @ factors.cross_G[i].T
            d_a, u_a = safe_eigh(isq_a[i] @ x_a @ isq_a[i], name=f"whitened X_A of layer {i}")
            d_g, u_g = safe_eigh(isq_g[i] @ x_g @ isq_g[i], name=f"whitened X_G of layer {i}")
            d_a, d_g = d_a.clamp(0, 1), d_g.clamp(0, 1)
            den = 1 - torch.outer(d_g, d_a)
            den = torch.where(den == 0, torch.ones_like(den), den)  # Martens' "hack"
            self.K_A.append(isq_a[i] @ u_a)
            self.K_G.append(isq_g[i] @ u_g)
            self.denom.append(den)

    def apply(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """``F̂⁻¹`` applied to gradient matrices ``V_i`` of shape ``(..., out_i, in_i)``."""
        n = len(self.inv_A)
        if len(vs) != n:
            raise ValueError(f"expected {n} gradient matrices, got {len(vs)}")
        for i, v in enumerate(vs):
            shape = (self.inv_G[i].shape[0], self.inv_A[i].shape[0])
            if tuple(v.shape[-2:]) != shape:
                raise ValueError(f"V[{i}] must have shape (..., {shape[0]}, {shape[1]}), got "
                                 f"{tuple(v.shape)}")
        # 1. u1 = Ξ v
        u1 = [vs[i] - self.psi_G[i] @ vs[i + 1] @ self.psi_A[i].T for i in range(n - 1)]
        u1.append(vs[-1])
        # 2. u2 = Λ u1
        u2 = [self.K_G[i] @ ((self.K_G[i].T @ u1[i] @ self.K_A[i]) / self.denom[i])
              @ self.K_A[i].T for i in range(n - 1)]
        u2.append(self.inv_G[-1] @ u1[-1] @ self.inv_A[-1])
        # 3. u3 = Ξᵀ u2
        u3 = [u2[0]]
        for i in range(1, n):
            u3.append(u2[i] - self.psi_G[i - 1].T @ u2[i - 1] @ self.psi_A[i - 1])
        return u3


def tridiagonal_factors(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    layers: LayerTable | Sequence[KFACLayer],
    *,
    fisher: FisherType = "type2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> TridiagonalFactors:
    """Diagonal and cross-layer factors of a chain of Linear layers on one batch.

    The chain is the registered layers in order; every layer must be an ``nn.Linear`` fed with
    ``(N, in)`` inputs (``T = 1``). Scales as in :mod:`curvlab.kfac.factors`.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> t = tridiagonal_factors(net, nn.MSELoss(), torch.randn(5, 3), torch.randn(5, 2),
        ...                         find_layers(net))
        >>> [tuple(c.shape) for c in t.cross_A], [tuple(c.shape) for c in t.cross_G]
        ([(4, 5)], [(4, 2)])
    """
    chain = _layer_list(layers)
    for layer in chain:
        if layer.kind != "linear":
            raise ValueError(f"block-tridiagonal K-FAC supports chains of nn.Linear layers; "
                             f"layer {layer.name!r} is {layer.kind}")
    cap, n, rule = capture_statistics(model, loss_fn, inputs, targets, chain, fisher=fisher,
                                      mc_samples=mc_samples, generator=generator)
    kw = {"fisher": fisher, "reduction": rule.reduction, "mc_samples": mc_samples}
    diag, cross_a, cross_g = [], [], []
    for layer in chain:
        xs, gs = cap.inputs[layer.name], cap.output_grads[layer.name]
        if len(xs) != 1 or xs[0].shape[1] != 1:
            raise ValueError(f"block-tridiagonal K-FAC: layer {layer.name!r} must be called once "
                             "per forward on (N, in) inputs")
        diag.append(KroneckerFactors(input_factor(layer, xs), output_factor(layer, gs, n, **kw),
                                     n))
    for a, b in itertools.pairwise(chain):
        cross_a.append(cross_input_factor(a, b, cap.inputs[a.name][0], cap.inputs[b.name][0]))
        cross_g.append(cross_output_factor(a, b, cap.output_grads[a.name],
                                           cap.output_grads[b.name], n, **kw))
    return TridiagonalFactors(diag, cross_a, cross_g)


def accumulate_tridiagonal(
    per_batch: Sequence[TridiagonalFactors], reduction: str = "mean"
) -> TridiagonalFactors:
    """Combine batches like :func:`curvlab.kfac.factors.accumulate_factors`.

    Example:
        >>> f = KroneckerFactors(torch.eye(1), torch.eye(1), 2)
        >>> t = TridiagonalFactors([f, f], [torch.ones(1, 1)], [torch.ones(1, 1)])
        >>> accumulate_tridiagonal([t, t], "sum").cross_G
        [tensor([[2.]])]
    """
    if not per_batch:
        raise ValueError("accumulate_tridiagonal: no batches")
    diag_dicts = [{str(i): f for i, f in enumerate(t.diag)} for t in per_batch]
    acc = accumulate_factors(diag_dicts, reduction)
    diag = [acc[str(i)] for i in range(len(per_batch[0].diag))]
    counts = [t.diag[0].num_examples for t in per_batch]
    total = sum(counts)
    m = len(per_batch[0].cross_A)
    cross_a = [sum(t.cross_A[i] * (c / total) for t, c in zip(per_batch, counts, strict=True))
               for i in range(m)]
    if reduction == "mean":
        cross_g = [sum(t.cross_G[i] * (c / total)
                       for t, c in zip(per_batch, counts, strict=True)) for i in range(m)]
    else:
        cross_g = [sum(t.cross_G[i] for t in per_batch) for i in range(m)]
    return TridiagonalFactors(diag, cross_a, cross_g)
