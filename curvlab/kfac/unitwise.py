r"""Unit-wise natural gradient for normalization layers (SP-NGD, Osawa et al. 2020).

For the affine parameters of ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm`` and ``nn.GroupNorm``,
``y = γ ⊙ x̂ + β``, each *unit* ``c`` (a channel; for LayerNorm an entry of
``normalized_shape``) owns the pair ``(γ_c, β_c)``. Its Fisher block is the ``2 × 2`` matrix

.. math::

    F_c = s \sum_k \sum_n g_{k,n,c}\, g_{k,n,c}^\top,\qquad
    g_{k,n,c} = \Big[\sum_t \delta_{k,n,t,c}\,\hat x_{n,t,c},\ \sum_t \delta_{k,n,t,c}\Big]

with ``δ`` the back-propagated output gradient of pass ``k`` (``t`` runs over the positions that
share the unit: spatial locations, sequence positions) and ``s`` the Fisher scale of
:func:`curvlab.kfac.factors.fisher_scale` — the same conventions as ``G`` of a Kronecker block,
so ``F_c`` is exactly the ``(γ_c, β_c)`` block of the GGN / Fisher / empirical Fisher at
``curvlab.GGN``'s scale whenever examples do not interact in the layer (LayerNorm, GroupNorm,
BatchNorm in eval mode; with BatchNorm in train mode the batch statistics couple the examples and
``F_c`` treats ``x̂`` as given, as SP-NGD does). Without a bias the block is ``1 × 1``. The
damped inverse ``(F_c + λ I)⁻¹`` is applied per unit, batched over units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.kfac.factors import fisher_scale

__all__ = ["NORM_TYPES", "NormLayer", "UnitWiseBlock", "find_norm_layers", "unit_fisher"]

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class NormLayer:
    """A normalization layer whose affine parameters get unit-wise blocks.

    Attributes:
        name: Qualified module name.
        module: The BatchNorm / LayerNorm / GroupNorm module.
        weight: Qualified name of ``γ``; ``bias``: of ``β`` or ``None``.

    Example:
        >>> layer = NormLayer("0", nn.LayerNorm(3), "0.weight", "0.bias")
        >>> layer.units, layer.unit_dim
        (3, 2)
    """

    name: str
    module: nn.Module = field(repr=False)
    weight: str
    bias: str | None
    kind: str = "norm"

    def __post_init__(self) -> None:
        if not isinstance(self.module, NORM_TYPES):
            raise TypeError(f"NormLayer {self.name!r}: needs BatchNorm, LayerNorm or GroupNorm, "
                            f"got {type(self.module).__name__}")
        if getattr(self.module, "weight", None) is None:
            raise ValueError(f"NormLayer {self.name!r}: the module has no affine weight")

    @property
    def weight_param(self) -> Tensor:
        return self.module.weight

    @property
    def units(self) -> int:
        return int(self.module.weight.numel())

    @property
    def unit_dim(self) -> int:
        """2 with a bias (``(γ_c, β_c)``), 1 without."""
        return 2 if self.bias is not None else 1

    @property
    def param_names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # ---- capture -------------------------------------------------------------------------
    def normalized(self, x: Tensor) -> Tensor:
        """``x̂``: the module's normalization without the affine part."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        use_batch = m.training or m.running_mean is None
        return F.batch_norm(x, None if use_batch else m.running_mean,
                            None if use_batch else m.running_var, None, None, use_batch, 0.0,
                            m.eps)

    def to_units(self, t: Tensor) -> Tensor:
        """``(N, T, U)``: a tensor shaped like the module's output with units last."""
        if isinstance(self.module, nn.LayerNorm):
            k = len(self.module.normalized_shape)
            return t.reshape(t.shape[0], -1, self.units) if t.dim() > k else \
                t.reshape(1, 1, self.units)
        if t.dim() == 1 or (isinstance(self.module, nn.modules.batchnorm._BatchNorm)
                            and t.dim() == 2):
            return t.reshape(-1, 1, self.units)
        return t.flatten(2).transpose(1, 2)

    def expand_input(self, x: Tensor) -> Tensor:
        return self.to_units(self.normalized(x))

    def expand_grad(self, g: Tensor) -> Tensor:
        return self.to_units(g)


def find_norm_layers(model: nn.Module, names: dict[int, str]) -> list[NormLayer]:
    """Normalization layers of ``model`` whose affine weight is selected (``names``: id →
    qualified name of the selected parameters)."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, NORM_TYPES) and getattr(mod, "weight", None) is not None \
                and id(mod.weight) in names:
            bias = getattr(mod, "bias", None)
            out.append(NormLayer(mod_name, mod, names[id(mod.weight)],
                                 names.get(id(bias)) if bias is not None else None))
    return out


def per_example_unit_grads(layer: NormLayer, x_hat: Tensor, grad: Tensor) -> Tensor:
    """``(N, U, unit_dim)`` per-example gradients ``[Σ_t δ x̂, Σ_t δ]`` of one pass."""
    gw = (grad * x_hat).sum(1)
    if layer.bias is None:
        return gw.unsqueeze(-1)
    return torch.stack([gw, grad.sum(1)], dim=-1)


def unit_fisher(layer: NormLayer, x_hat: Tensor, grads: list[Tensor], num_examples: int, *,
                fisher: str, reduction: str, mc_samples: int = 1) -> Tensor:
    """``(U, d, d)`` unit-wise Fisher blocks (module docstring), ``d = unit_dim``.

    Example:
        >>> layer = NormLayer("0", nn.LayerNorm(2), "0.weight", "0.bias")
        >>> x_hat, g = torch.ones(1, 1, 2), torch.full((1, 1, 2), 2.0)
        >>> unit_fisher(layer, x_hat, [g], 1, fisher="type2", reduction="sum")[0]
        tensor([[4., 4.],
                [4., 4.]])
    """
    s = fisher_scale(fisher, num_examples, reduction, mc_samples)
    total = None
    for g in grads:
        pe = per_example_unit_grads(layer, x_hat, g)
        term = s * torch.einsum("nui,nuj->uij", pe, pe)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"layer {layer.name!r}: no output gradients for the unit-wise Fisher")
    return total


class UnitWiseBlock:
    r"""Unit-wise Fisher blocks of one normalization layer with their running average.

    Same interface as :class:`~curvlab.kfac.blocks.KroneckerBlock` where it applies:
    :meth:`update` (EMA with the ``min(1 − 1/k, ema_decay)`` warm start), :meth:`set_factors`,
    :meth:`refresh`, :meth:`multiply` on ``(…, U, d)`` matrices, ``state_dict``.

    Example:
        >>> layer = NormLayer("0", nn.LayerNorm(2), "0.weight", "0.bias")
        >>> block = UnitWiseBlock(layer)
        >>> block.update(torch.eye(2).expand(2, 2, 2))
        >>> _ = block.refresh()
        >>> block.multiply(torch.ones(2, 2), power=-1, damping=1.0)
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """

    def __init__(self, layer: NormLayer, *, ema_decay: float = 0.95) -> None:
        self.layer = layer
        self.name = layer.name
        self.ema_decay = float(ema_decay)
        self.F: Tensor | None = None
        self.updates = 0
        self.stale = False
        self.eig: Any = None  # a marker: the damped inverse is formed on demand (2 × 2)
        self.ekfac = False
        self.split_dim = None

    @property
    def has_factors(self) -> bool:
        return self.F is not None

    def factors(self) -> tuple[Tensor, ...]:
        return () if self.F is None else (self.F,)

    def ema_weight(self) -> float:
        k = self.updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    def update(self, F_new: Tensor) -> None:
        eps = self.ema_weight()
        x = eps * self.F + (1.0 - eps) * F_new if self.F is not None and eps > 0.0 \
            else F_new.clone()
        self.F = 0.5 * (x + x.mT)
        self.updates += 1
        self.stale = True

    def set_factors(self, F_new: Tensor) -> None:
        self.F = F_new
        self.updates = max(self.updates, 1)
        self.stale = True

    def eigh_inputs(self) -> None:
        """Nothing to eigendecompose (the 2×2 unit blocks are inverted directly)."""
        return None

    def refresh(self) -> bool:
        if self.F is None or not bool(torch.isfinite(self.F).all()):
            return False
        self.eig = self.F.clone()  # the factors the inverse uses until the next refresh
        self.stale = False
        return True

    def multiply(self, V: Tensor, power: int = -1, damping: float = 0.0, *,
                 inverse: str | None = None) -> Tensor:
        """``(F_c + λI)^power`` per unit on ``V`` of shape ``(..., U, d)``."""
        if power not in (1, -1):
            raise ValueError(f"power must be 1 or -1, got {power!r}")
        mats = self.F if power == 1 else self.eig
        if mats is None:
            raise RuntimeError(f"unit-wise block {self.name!r} has no "
                               f"{'factors' if power == 1 else 'inverse'} yet")
        d = self.layer.unit_dim
        if tuple(V.shape[-2:]) != (self.layer.units, d):
            raise ValueError(f"unit-wise block {self.name!r}: V must end in shape "
                             f"{(self.layer.units, d)}, got {tuple(V.shape)}")
        vf = V.to(mats.dtype)
        eye = torch.eye(d, dtype=mats.dtype, device=mats.device)
        m = mats + damping * eye
        if power == 1:
            out = (m @ vf.unsqueeze(-1)).squeeze(-1)
        else:
            if damping <= 0 and bool((torch.linalg.det(m) <= 0).any()):
                raise ValueError(f"unit-wise block {self.name!r}: singular; use damping > 0")
            out = torch.linalg.solve(m, vf.unsqueeze(-1)).squeeze(-1)
        return out.to(V.dtype)

    def to_dense(self, power: int = 1, damping: float = 0.0, *, inverse: str | None = None
                 ) -> Tensor:
        """Dense block in the order (γ_1, β_1, γ_2, β_2, …) (tests)."""
        mats = self.F if power == 1 else self.eig
        eye = torch.eye(self.layer.unit_dim, dtype=mats.dtype, device=mats.device)
        m = mats + damping * eye
        return torch.block_diag(*(m if power == 1 else torch.linalg.inv(m)).unbind(0))

    def memory_bytes(self) -> dict[str, int]:
        size = sum(t.numel() * t.element_size() for t in (self.F, self.eig)
                   if isinstance(t, Tensor))
        return {"factors": size // 2 if self.eig is not None else size,
                "inverses": size // 2 if self.eig is not None else 0}

    def state_dict(self) -> dict[str, Any]:
        return {"F": None if self.F is None else self.F.clone(), "updates": self.updates,
                "eig": None if self.eig is None else self.eig.clone(), "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        f = state["F"]
        if f is not None and tuple(f.shape) != (self.layer.units,) + (self.layer.unit_dim,) * 2:
            raise ValueError(f"unit-wise block {self.name!r}: saved F has shape "
                             f"{tuple(f.shape)}")
        self.F = None if f is None else f.clone()
        self.updates = int(state["updates"])
        self.eig = None if state["eig"] is None else state["eig"].clone()
        self.stale = bool(state["stale"])

    def __repr__(self) -> str:
        return (f"UnitWiseBlock({self.name!r}, units={self.layer.units}, "
                f"d={self.layer.unit_dim}, updates={self.updates})")
