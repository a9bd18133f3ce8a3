r"""EKFAC: diagonal rescaling of K-FAC in the Kronecker-factored eigenbasis (George et al. 2018).

With ``A = U_A diag(d_A) U_Aᵀ`` and ``G = U_G diag(d_G) U_Gᵀ`` the K-FAC block (row-major order
of ``[W | b]``) is ``(U_G ⊗ U_A) diag(d_G ⊗ d_A) (U_G ⊗ U_A)ᵀ``. EKFAC keeps the basis and replaces
the eigenvalues by the second moments of the *per-example* gradients in that basis:

.. math::

    S^*_{ij} = s \sum_k \sum_n \big(U_G^\top D_{k,n} U_A\big)_{ij}^2, \qquad
    D_{k,n} = \sum_t \delta_{k,n,t}\, \bar a_{n,t}^\top

(per-example gradient of backward pass ``k``, summed over locations ``t`` for convolutions; ``s``
the Fisher scale of :mod:`curvlab.kfac.factors`). ``S*`` is therefore exactly the diagonal of the
true (GGN / Fisher / empirical-Fisher) layer block in the Kronecker eigenbasis, at the same
scale as ``curvlab.GGN``; for a single example it coincides with K-FAC's ``d_G d_Aᵀ`` (Linear
layers). The damped inverse is ``V ↦ U_G [(U_Gᵀ V U_A) ⊘ (S* + λ)] U_Aᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import LossFn
from curvlab.kfac.factors import (
    FisherType,
    KroneckerFactors,
    _homogeneous,
    _layer_list,
    capture_statistics,
    fisher_scale,
    input_factor,
    output_factor,
)
from curvlab.kfac.inverse import EigenInverse, safe_eigh
from curvlab.kfac.layers import KFACLayer, LayerTable

__all__ = ["EKFACFactors", "eigenbases", "ekfac_factors", "ekfac_scalings"]


def ekfac_scalings(
    layer: KFACLayer,
    inputs: Tensor | Sequence[Tensor],
    output_grads: Sequence[Tensor],
    U_A: Tensor,
    U_G: Tensor,
    num_examples: int,
    *,
    fisher: FisherType = "type2",
    reduction: str = "mean",
    mc_samples: int = 1,
) -> Tensor:
    """Second moments ``S*`` (``(out_dim, in_dim)``) of per-example gradients in the eigenbasis.

    Args:
        layer: The layer.
        inputs: Expanded inputs ``(N, T, fan_in)`` of *one* forward (a list is concatenated).
        output_grads: One ``(N, T, out)`` tensor per backward pass over that forward.
        U_A, U_G: Eigenbases of ``A`` and ``G``.
        num_examples, fisher, reduction, mc_samples: As in
            :func:`curvlab.kfac.factors.output_factor`.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(nn.Sequential(nn.Linear(1, 1, bias=False))).layers[0]
        >>> x, g = torch.tensor([[[2.0]], [[1.0]]]), [torch.tensor([[[3.0]], [[1.0]]])]
        >>> ekfac_scalings(layer, x, g, torch.eye(1), torch.eye(1), 2)  # 6² + 1²
        tensor([[37.]])
    """
    x = inputs if isinstance(inputs, Tensor) else torch.cat(list(inputs), 0)
    a = _homogeneous(layer, x.to(U_A.dtype)) @ U_A  # (N, T, in)
    s = fisher_scale(fisher, num_examples, reduction, mc_samples)
    total = None
    for g in output_grads:
        if g.shape[:2] != a.shape[:2]:
            raise ValueError(f"layer {layer.name!r}: output gradients {tuple(g.shape)} do not "
                             f"match inputs {tuple(x.shape)} (same forward needed)")
        gt = g.to(U_G.dtype) @ U_G  # (N, T, out)
        if g.shape[1] == 1:
            term = s * (gt[:, 0].square().mT @ a[:, 0].square())
        else:
            term = s * torch.einsum("nto,nti->noi", gt, a).square().sum(0)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"layer {layer.name!r}: no output gradients for the EKFAC scalings")
    return total


@dataclass
class EKFACFactors:
    """Eigenbases and EKFAC scalings of one layer: block ≈ ``U diag(S*) Uᵀ``, ``U = U_G ⊗ U_A``.

    Attributes:
        U_A: ``(in_dim, in_dim)`` eigenvectors of ``A``.
        U_G: ``(out_dim, out_dim)`` eigenvectors of ``G``.
        scalings: ``(out_dim, in_dim)`` second moments ``S*``.
        num_examples: Examples the scalings were estimated from.

    Example:
        >>> f = EKFACFactors(torch.eye(2), torch.eye(1), torch.tensor([[1.0, 4.0]]), 1)
        >>> f.mv(torch.ones(1, 2)), f.apply(torch.ones(1, 2), damping=1.0)
        (tensor([[1., 4.]]), tensor([[0.5000, 0.2000]]))
    """

    U_A: Tensor
    U_G: Tensor
    scalings: Tensor
    num_examples: int

    def mv(self, v: Tensor) -> Tensor:
        """EKFAC block times ``V`` (``(..., out_dim, in_dim)``)."""
        return self.U_G @ ((self.U_G.T @ v @ self.U_A) * self.scalings) @ self.U_A.T

    def apply(self, v: Tensor, damping: float) -> Tensor:
        """``(EKFAC block + λ I)⁻¹ V``."""
        return self.inverse(damping).apply(v)

    def block(self) -> Tensor:
        """Dense block in row-major order of ``[W | b]`` (small layers; for tests)."""
        u = torch.kron(self.U_G, self.U_A)
        return u @ torch.diag(self.scalings.reshape(-1)) @ u.T

    def inverse(self, damping: float, name: str = "layer") -> EigenInverse:
        """An :class:`~curvlab.kfac.inverse.EigenInverse` with the EKFAC scalings."""
        return EigenInverse.from_basis(self.U_A, self.U_G, self.scalings, damping, name=name)


def eigenbases(factors: KroneckerFactors, name: str = "layer") -> tuple[Tensor, Tensor]:
    """``(U_A, U_G)`` from guarded eigendecompositions of the factors.

    Example:
        >>> u_a, u_g = eigenbases(KroneckerFactors(torch.eye(3), torch.eye(2), 1))
        >>> u_a.shape, u_g.shape
        (torch.Size([3, 3]), torch.Size([2, 2]))
    """
    u_a = safe_eigh(factors.A, name=f"A of {name}")[1]
    return u_a, safe_eigh(factors.G, name=f"G of {name}")[1]


def ekfac_factors(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    layers: LayerTable | Sequence[KFACLayer],
    *,
    fisher: FisherType = "type2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    bases: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, EKFACFactors]:
    """EKFAC factors on one batch; the eigenbasis comes from ``bases`` or from this batch's K-FAC.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> f = ekfac_factors(net, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 2),
        ...                   find_layers(net))
        >>> f["0"].scalings.shape
        torch.Size([2, 4])
    """
    cap, n, rule = capture_statistics(model, loss_fn, inputs, targets, layers, fisher=fisher,
                                      mc_samples=mc_samples, generator=generator)
    out = {}
    for layer in _layer_list(layers):
        if layer.kind == "embedding":  # diagonal A: its eigenbasis is the identity, K-FAC's
            continue  # eigenvalues are kept (EKFAC applies to the other layers)
        xs, gs = cap.layer_inputs(layer.name), cap.layer_output_grads(layer.name)
        if bases is not None and layer.name in bases:
            u_a, u_g = bases[layer.name]
        else:
            kf = KroneckerFactors(
                input_factor(layer, xs),
                output_factor(layer, gs, n, fisher=fisher, reduction=rule.reduction,
                              mc_samples=mc_samples), n)
            u_a, u_g = eigenbases(kf, layer.name)
        s = ekfac_scalings(layer, xs, gs, u_a, u_g, n, fisher=fisher, reduction=rule.reduction,
                           mc_samples=mc_samples)
        out[layer.name] = EKFACFactors(u_a, u_g, s, n)
    return out
