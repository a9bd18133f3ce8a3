r"""Damped inverses of one Kronecker block ``G ⊗ A`` (curvlab row-major order of ``[W | b]``).

Two damping semantics, deliberately with different names:

* :class:`EigenInverse` — exact Tikhonov damping of the product, ``(G ⊗ A + λ I)⁻¹``, through
  the eigenbases ``A = U_A diag(d_A) U_Aᵀ``, ``G = U_G diag(d_G) U_Gᵀ``:
  ``V ↦ U_G [(U_Gᵀ V U_A) ⊘ (d_G d_Aᵀ + λ)] U_Aᵀ``. ``λ`` is on the scale of the curvature
  itself. Optional ``scales`` replace ``d_G d_Aᵀ`` (EKFAC).
* :class:`FactoredInverse` — Martens & Grosse's factored Tikhonov with π (spec §1.4):
  ``(G + (√γ/π) I)⁻¹ ⊗ (A + π√γ I)⁻¹``, ``V ↦ (G + √γ/π I)⁻¹ V (A + π√γ I)⁻¹``, with the
  trace-norm ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (1 if either trace is 0). The damped
  matrix is ``G⊗A + γ I + (π√γ G ⊗ I + √γ/π I ⊗ A)``: more damping than ``γ I``.

:func:`safe_eigh` guards the eigendecomposition: symmetrize, refuse NaN/Inf, retry in float64,
clamp eigenvalues at 0. On failure it raises :class:`EighError` so a caller can keep its last good
inverse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["EigenInverse", "EighError", "FactoredInverse", "pi_tracenorm", "safe_eigh",
           "safe_eigh_many"]


class EighError(RuntimeError):
    """An eigendecomposition failed (non-finite input, or no convergence even in float64)."""


def safe_eigh(m: Tensor, *, name: str = "matrix", retry_float64: bool = True
              ) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition ``(eigenvalues ≥ 0, eigenvectors)`` of a symmetric PSD matrix.

    Symmetrizes ``(M + Mᵀ)/2``, raises :class:`EighError` for non-finite entries, retries a
    failed ``torch.linalg.eigh`` in float64 (unless ``retry_float64=False``), clamps eigenvalues
    at 0, returns ``M``'s dtype. Batched inputs ``(..., n, n)`` are accepted.

    Example:
        >>> d, u = safe_eigh(torch.tensor([[2.0, 0.0], [0.0, -1e-9]]))
        >>> d
        tensor([0., 2.])
        >>> safe_eigh(torch.tensor([[float("nan")]]), name="A of layer 'fc'")
        Traceback (most recent call last):
        ...
        curvlab.kfac.inverse.EighError: A of layer 'fc' has non-finite entries (NaN/Inf); eigendecomposition skipped
    """  # noqa: E501
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise EighError(f"{name} has non-finite entries (NaN/Inf); eigendecomposition skipped")
    sym = (m + m.transpose(-1, -2)) / 2
    try:
        d, u = torch.linalg.eigh(sym)
    except RuntimeError as first:
        if sym.dtype == torch.float64 or not retry_float64:
            what = str(sym.dtype).removeprefix("torch.")
            raise EighError(f"{name}: eigh failed in {what}: {first}") from first
        try:
            d, u = torch.linalg.eigh(sym.double())
        except RuntimeError as err:
            raise EighError(f"{name}: eigh failed in {sym.dtype} and float64: {err}") from err
        d, u = d.to(m.dtype), u.to(m.dtype)
    if not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(u).all())):
        raise EighError(f"{name}: eigh returned non-finite values")
    return d.clamp_min(0), u


def safe_eigh_many(mats: list[Tensor], names: list[str]
                   ) -> list[tuple[Tensor, Tensor] | EighError]:
    """:func:`safe_eigh` of each matrix, same-size ones in one batched ``torch.linalg.eigh``.

    Matrices of equal size, dtype and device are stacked and decomposed in one call (one LAPACK
    dispatch per stack instead of one Python round trip per matrix; on the CPU the result is
    bit-identical to decomposing them one by one). A stack with a non-finite entry, a failed
    decomposition or non-finite output falls back to :func:`safe_eigh` per matrix, so every
    matrix gets exactly the guarded result it would get alone. Returns, per matrix, the
    ``(eigenvalues, eigenvectors)`` or the :class:`EighError` that :func:`safe_eigh` raised.

    Example:
        >>> out = safe_eigh_many([torch.eye(2), 2 * torch.eye(2), torch.tensor([[1.0]])],
        ...                      ["a", "b", "c"])
        >>> [tuple(d.tolist()) for d, _ in out]
        [(1.0, 1.0), (2.0, 2.0), (1.0,)]
    """
    if len(mats) != len(names):
        raise ValueError(f"safe_eigh_many: {len(mats)} matrices but {len(names)} names")
    out: list[tuple[Tensor, Tensor] | EighError | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        if m.dim() == 2 and m.shape[0] == m.shape[1]:
            groups.setdefault((m.shape[0], m.dtype, m.device), []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        try:  # no float64 retry of the whole stack: that is per matrix, below
            d, u = safe_eigh(torch.stack([mats[i] for i in idx]), retry_float64=False)
        except EighError:
            continue
        for k, i in enumerate(idx):  # own storage each (a view would save the whole stack)
            out[i] = (d[k].clone(), u[k].clone())
    for i, m in enumerate(mats):
        if out[i] is None:
            try:
                out[i] = safe_eigh(m, name=names[i])
            except EighError as err:
                out[i] = err
    return out  # type: ignore[return-value]


def pi_tracenorm(A: Tensor, G: Tensor) -> float:
    """Trace-norm π = sqrt((tr A/dim A)/(tr G/dim G)); 1 if either trace is ≤ 0.

    Example:
        >>> pi_tracenorm(4 * torch.eye(3), torch.eye(2))
        2.0
    """
    ta = float(torch.diagonal(A).sum()) / A.shape[-1]
    tg = float(torch.diagonal(G).sum()) / G.shape[-1]
    if ta <= 0 or tg <= 0 or not (math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def _check_factors(A: Tensor, G: Tensor) -> None:
    for nm, m in (("A", A), ("G", G)):
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"{nm} must be a square matrix, got shape {tuple(m.shape)}")


def _check_v(v: Tensor, out_dim: int, in_dim: int, who: str) -> None:
    if v.dim() < 2 or tuple(v.shape[-2:]) != (out_dim, in_dim):
        raise ValueError(f"{who}.apply: V must have shape (..., {out_dim}, {in_dim}) "
                         f"(out_dim, in_dim incl. bias column), got {tuple(v.shape)}")


class EigenInverse:
    r"""``(G ⊗ A + λ I)⁻¹`` (or ``(U diag(scales) Uᵀ + λ I)⁻¹`` for EKFAC) via eigenbases.

    Args:
        A: ``(in_dim, in_dim)`` input factor.
        G: ``(out_dim, out_dim)`` output factor.
        damping: ``λ ≥ 0`` added to every eigenvalue ``d_G,i d_A,j`` of the product.
        scales: Optional ``(out_dim, in_dim)`` eigenvalues replacing ``d_G d_Aᵀ`` (EKFAC).
        name: Used in error messages.

    Raises:
        EighError: from :func:`safe_eigh` (callers may keep their previous inverse).
        ValueError: for ``λ < 0``, or ``λ = 0`` with a zero eigenvalue.

    Example:
        >>> A, G = torch.diag(torch.tensor([1.0, 2.0])), torch.tensor([[3.0]])
        >>> inv = EigenInverse(A, G, damping=1.0)
        >>> inv.apply(torch.ones(1, 2))  # 1 / (3 * [1, 2] + 1)
        tensor([[0.2500, 0.1429]])
    """

    def __init__(
        self, A: Tensor, G: Tensor, damping: float, *, scales: Tensor | None = None,
        name: str = "layer",
    ) -> None:
        _check_factors(A, G)
        d_a, u_a = safe_eigh(A, name=f"A of {name}")
        d_g, u_g = safe_eigh(G, name=f"G of {name}")
        self._setup(u_a, u_g, d_a, d_g, scales, damping, name)

    @classmethod
    def from_basis(
        cls, U_A: Tensor, U_G: Tensor, scales: Tensor, damping: float, *, name: str = "layer"
    ) -> EigenInverse:
        """Build from given eigenbases and eigenvalues ``scales`` (``(out, in)``), e.g. EKFAC.

        Example:
            >>> inv = EigenInverse.from_basis(torch.eye(2), torch.eye(1),
            ...                               torch.tensor([[1.0, 3.0]]), damping=1.0)
            >>> inv.apply(torch.ones(1, 2))
            tensor([[0.5000, 0.2500]])
        """
        self = cls.__new__(cls)
        self._setup(U_A, U_G, None, None, scales, damping, name)
        return self

    def _setup(self, u_a, u_g, d_a, d_g, scales, damping, name) -> None:
        if damping < 0:
            raise ValueError(f"{name}: damping must be >= 0, got {damping}")
        self.damping = float(damping)
        self.name = name
        self.U_A, self.U_G, self.d_A, self.d_G = u_a, u_g, d_a, d_g
        if scales is None:
            scales = torch.outer(d_g, d_a)
        elif tuple(scales.shape) != (u_g.shape[0], u_a.shape[0]):
            raise ValueError(f"{name}: scales must have shape {(u_g.shape[0], u_a.shape[0])}, "
                             f"got {tuple(scales.shape)}")
        self.scales = scales
        denom = scales + self.damping
        if bool((denom <= 0).any()):
            raise ValueError(f"{name}: damping {damping} leaves a zero eigenvalue; use damping > 0")
        self.inv_denom = 1.0 / denom

    @property
    def out_dim(self) -> int:
        return self.U_G.shape[0]

    @property
    def in_dim(self) -> int:
        return self.U_A.shape[0]

    def to_eigenbasis(self, v: Tensor) -> Tensor:
        """``U_Gᵀ V U_A`` (batched over leading dims)."""
        return self.U_G.T @ v @ self.U_A

    def from_eigenbasis(self, v: Tensor) -> Tensor:
        """``U_G V U_Aᵀ``."""
        return self.U_G @ v @ self.U_A.T

    def apply(self, v: Tensor) -> Tensor:
        """Apply the damped inverse to ``V`` of shape ``(..., out_dim, in_dim)``."""
        _check_v(v, self.out_dim, self.in_dim, "EigenInverse")
        return self.from_eigenbasis(self.to_eigenbasis(v) * self.inv_denom)

    def damped_matrix(self) -> Tensor:
        """Dense ``U diag(scales + λ) Uᵀ`` (row-major, small layers only; for tests)."""
        u = torch.kron(self.U_G, self.U_A)
        return u @ torch.diag((self.scales + self.damping).reshape(-1)) @ u.T


class FactoredInverse:
    r"""π-adjusted factored Tikhonov: ``(G + √γ/π I)⁻¹ ⊗ (A + π√γ I)⁻¹``.

    Args:
        A, G: Factors.
        damping: ``γ ≥ 0``; each factor gets ``√γ`` times ``π`` or ``1/π``.
        pi: ``"tracenorm"`` (default, :func:`pi_tracenorm`), or a positive float, or ``1``.
        name: Used in error messages.

    Attributes:
        pi: The π used. ``A_damped``, ``G_damped``: the damped factors.

    Example:
        >>> inv = FactoredInverse(torch.eye(2), torch.eye(1), damping=1.0)
        >>> inv.pi, inv.apply(torch.ones(1, 2))  # (1+1)^-1 * 1 * (1+1)^-1
        (1.0, tensor([[0.2500, 0.2500]]))
    """

    def __init__(
        self, A: Tensor, G: Tensor, damping: float, *, pi: str | float = "tracenorm",
        name: str = "layer",
    ) -> None:
        _check_factors(A, G)
        if damping < 0:
            raise ValueError(f"{name}: damping must be >= 0, got {damping}")
        if pi == "tracenorm":
            pi_val = pi_tracenorm(A, G)
        elif isinstance(pi, int | float) and pi > 0:
            pi_val = float(pi)
        else:
            raise ValueError(f"{name}: pi must be 'tracenorm' or a positive number, got {pi!r}")
        self.damping = float(damping)
        self.pi = pi_val
        self.name = name
        root = math.sqrt(self.damping)
        eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        self.A_damped = A + pi_val * root * eye_a
        self.G_damped = G + root / pi_val * eye_g
        self.d_A, self.U_A = safe_eigh(self.A_damped, name=f"damped A of {name}")
        self.d_G, self.U_G = safe_eigh(self.G_damped, name=f"damped G of {name}")
        if bool((self.d_A <= 0).any()) or bool((self.d_G <= 0).any()):
            raise ValueError(f"{name}: damped factors are singular; use damping > 0")
        self.A_inv = (self.U_A / self.d_A) @ self.U_A.T
        self.G_inv = (self.U_G / self.d_G) @ self.U_G.T

    @property
    def out_dim(self) -> int:
        return self.G_inv.shape[0]

    @property
    def in_dim(self) -> int:
        return self.A_inv.shape[0]

    def apply(self, v: Tensor) -> Tensor:
        """Apply ``G_d⁻¹ V A_d⁻¹`` to ``V`` of shape ``(..., out_dim, in_dim)``."""
        _check_v(v, self.out_dim, self.in_dim, "FactoredInverse")
        return self.G_inv @ v @ self.A_inv

    def damped_matrix(self) -> Tensor:
        """Dense ``G_d ⊗ A_d`` (row-major, small layers only; for tests)."""
        return torch.kron(self.G_damped, self.A_damped)
