r"""One layer's Kronecker block: factors, their running average, inverses and EKFAC scalings.

A :class:`KroneckerBlock` is the single stateful object behind every K-FAC entry point of
curvlab (the :class:`curvlab.KFAC` operator, the K-FAC optimizer and
:class:`curvlab.KFACPreconditioner`). It owns, for one registered layer
(:class:`~curvlab.kfac.layers.KFACLayer`):

* the factors ``A`` (input, ``in_dim × in_dim``) and ``G`` (output, ``out_dim × out_dim``), set
  directly (:meth:`~KroneckerBlock.set_factors`, the operator's estimate over a data set) or as
  an exponential moving average (:meth:`~KroneckerBlock.update`) with Martens & Grosse's warm
  start ``ε_k = min(1 − 1/k, ema_decay)`` (``k`` counts this block's updates);
* the eigendecompositions of ``A`` and ``G`` at the last :meth:`~KroneckerBlock.refresh`
  (:class:`Eigendecomposition`, guarded by :func:`~curvlab.kfac.inverse.safe_eigh`: a failure
  warns and keeps the last good one). They do not depend on the damping, so a new damping (the
  adaptive γ search) costs no new ``eigh``;
* the EKFAC scalings (second moments of per-example gradients in the Kronecker eigenbasis);
* products with the damped block or its inverse, :meth:`~KroneckerBlock.multiply`.

Conventions. In curvlab's row-major order of the homogeneous matrix ``V = [W.reshape(out, -1) |
b]`` the block is ``G ⊗ A``, i.e. ``(G ⊗ A) vec(V) = vec(G V A)``. Inverses:

* ``inverse='eigen'``: exact Tikhonov damping of the product,
  ``(G ⊗ A + λ I)⁻¹ V = U_G [(U_Gᵀ V U_A) ⊘ (d_G d_Aᵀ + λ)] U_Aᵀ`` (EKFAC: the scalings replace
  ``d_G d_Aᵀ``);
* ``inverse='cholesky'``: the same π-adjusted factored inverse computed without any
  eigendecomposition — a refresh snapshots the factors, and the explicit damped inverses come
  from Cholesky factorizations (about a fifth of an ``eigh``'s work); no eigen-based products.
* ``inverse='factored'``: Martens & Grosse's π-adjusted factored Tikhonov
  ``(G + √λ/π I)⁻¹ V (A + π√λ I)⁻¹`` with ``π = sqrt((tr A/dim A)/(tr G/dim G))`` (1 when a
  trace is 0), the explicit damped inverses built from the cached eigenbases and kept per
  damping value.

``split_dim=k`` (THOR): a factor larger than ``k`` is kept as its block-diagonal part with
blocks of at most ``k`` (:class:`~curvlab.kfac.split.SplitMatrix`), so the block is
``blockdiag(G) ⊗ blockdiag(A)`` and both inverses above apply to that matrix exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from curvlab.kfac.inverse import EighError, safe_eigh
from curvlab.kfac.layers import KFACLayer
from curvlab.kfac.split import SplitMatrix, split_eigh

__all__ = ["Eigendecomposition", "InverseKind", "KroneckerBlock"]

InverseKind = Literal["eigen", "factored", "cholesky"]
INVERSES = ("eigen", "factored", "cholesky")


class FactorSnapshot(NamedTuple):
    """The factors at the last refresh (``inverse='cholesky'``: no eigendecomposition)."""

    A: Tensor
    G: Tensor


def _cholesky_inverse(X, shift: float, what: str):
    """``(X + shift I)⁻¹`` by Cholesky (batched over split blocks)."""
    if isinstance(X, SplitMatrix):
        return X._map(lambda t: _cholesky_inverse(t, shift, what))
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    L, info = torch.linalg.cholesky_ex(X + shift * eye)
    if bool((info != 0).any()):
        raise ValueError(f"{what} + {shift:g} I is not positive definite; use damping > 0")
    return torch.cholesky_inverse(L)


class Eigendecomposition(NamedTuple):
    """Eigendecompositions of a block's factors: ``A = U_A diag(d_A) U_Aᵀ`` (same for ``G``).

    Example:
        >>> e = Eigendecomposition(torch.ones(2), torch.eye(2), torch.ones(1), torch.eye(1))
        >>> e.eigenvalues_A
        tensor([1., 1.])
    """

    eigenvalues_A: Tensor
    eigenvectors_A: Tensor
    eigenvalues_G: Tensor
    eigenvectors_G: Tensor


def check_inverse(inverse: str, ekfac: bool) -> None:
    """Validate an ``inverse=`` / ``ekfac=`` pair (one message for every entry point)."""
    if inverse not in INVERSES:
        raise ValueError(f"inverse must be 'eigen', 'factored' or 'cholesky', got {inverse!r}")
    if ekfac and inverse != "eigen":
        raise ValueError("ekfac=True needs inverse='eigen' (the scalings live in the eigenbasis)")


class KroneckerBlock:
    r"""Kronecker factors of one layer with their average, inverses and EKFAC scalings.

    Args:
        layer: The registered layer.
        inverse: ``'eigen'`` or ``'factored'`` (see the module docstring); the default for
            :meth:`multiply` with ``power=-1``.
        ekfac: Keep EKFAC scalings (``inverse='eigen'``).
        ema_decay: Maximal weight of the old average in :meth:`update`.
        pi: ``'tracenorm'`` or a positive number, π of the factored damping.
        split_dim: Keep factors larger than this as block-diagonal parts with blocks of at most
            ``split_dim`` (THOR); ``None``: no splitting.

    Attributes:
        A, G: Current factors (``None`` before the first statistics).
        updates: Number of :meth:`update` calls (``k`` of the warm start).
        eig: :class:`Eigendecomposition` at the last successful :meth:`refresh`, or ``None``.
        scalings: EKFAC scalings ``(out_dim, in_dim)`` or ``None``; ``scaling_updates`` counts
            their average.
        stale: The factors changed since the last refresh.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> layer = find_layers(torch.nn.Sequential(torch.nn.Linear(1, 1))).layers[0]
        >>> block = KroneckerBlock(layer)
        >>> block.update(torch.eye(2), 3 * torch.eye(1))
        >>> block.refresh()
        True
        >>> block.multiply(torch.ones(1, 2), power=-1, damping=1.0)  # 1 / (3·1 + 1)
        tensor([[0.2500, 0.2500]])
    """

    def __init__(
        self, layer: KFACLayer, *, inverse: InverseKind = "eigen", ekfac: bool = False,
        ema_decay: float = 0.95, pi: str | float = "tracenorm", split_dim: int | None = None,
    ) -> None:
        check_inverse(inverse, ekfac)
        if split_dim is not None and (isinstance(split_dim, bool) or not isinstance(
                split_dim, int) or split_dim < 1):
            raise ValueError(f"split_dim must be None or an int >= 1, got {split_dim!r}")
        self.split_dim = split_dim
        if pi != "tracenorm" and not (isinstance(pi, int | float) and pi > 0):
            raise ValueError(f"pi must be 'tracenorm' or a positive number, got {pi!r}")
        self.layer = layer
        self.name = layer.name
        self.inverse = inverse
        self.ekfac = bool(ekfac)
        self.ema_decay = float(ema_decay)
        self.pi = pi
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.updates = 0
        self.eig: Eigendecomposition | None = None
        self.scalings: Tensor | None = None
        self.scaling_updates = 0
        self.stale = False
        self._explicit: dict[float, tuple[Tensor, Tensor]] = {}

    # ---- factors -------------------------------------------------------------------------
    def splits(self, n: int) -> bool:
        """Whether a factor of size ``n`` is split."""
        return self.split_dim is not None and n > self.split_dim

    def _as_split(self, X: Tensor | SplitMatrix | None):
        if X is None or isinstance(X, SplitMatrix) or not self.splits(X.shape[-1]):
            return X
        return SplitMatrix.from_dense(X, self.split_dim)

    @property
    def has_factors(self) -> bool:
        return self.A is not None and self.G is not None

    def factors(self) -> tuple:
        """The current factors ``(A, G)`` (empty before the first statistics)."""
        return (self.A, self.G) if self.has_factors else ()

    def ema_weight(self) -> float:
        """``ε_k = min(1 − 1/k, ema_decay)`` for the next :meth:`update`."""
        k = self.updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    def update(self, A: Tensor | None, G: Tensor | None) -> None:
        """Average new statistics into the factors: ``X ← ε X + (1 − ε) X_new``, symmetrized.

        Either factor may be ``None`` (not recomputed this step, e.g. by a refresh policy); a
        factor seen for the first time is taken as it is.
        """
        eps = self.ema_weight()
        for attr, new in (("A", A), ("G", G)):
            if new is None:
                continue
            new = self._as_split(new)
            old = getattr(self, attr)
            x = eps * old + (1.0 - eps) * new if old is not None and eps > 0.0 else new.clone()
            setattr(self, attr, 0.5 * (x + x.mT))
        self.updates += 1
        self.stale = True

    def set_factors(self, A: Tensor, G: Tensor) -> None:
        """Set the factors (an estimate over a data set, no averaging)."""
        self.A, self.G = self._as_split(A), self._as_split(G)
        self.updates = max(self.updates, 1)
        self.stale = True
        self.eig = None
        self._explicit.clear()

    def scaling_weight(self) -> float:
        k = self.scaling_updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    def update_scalings(self, S: Tensor) -> None:
        """Average new EKFAC scalings (same warm start, their own counter)."""
        eps = self.scaling_weight()
        if self.scalings is not None and eps > 0.0:
            self.scalings = eps * self.scalings + (1.0 - eps) * S
        else:
            self.scalings = S.clone()
        self.scaling_updates += 1

    def set_scalings(self, S: Tensor) -> None:
        """Set the EKFAC scalings (an estimate over a data set)."""
        self.scalings = S
        self.scaling_updates = max(self.scaling_updates, 1)

    # ---- inverses ------------------------------------------------------------------------
    def eigh_inputs(self) -> tuple[tuple[Tensor, str], tuple[Tensor, str]] | None:
        """``((A, name), (G, name))``: the dense factors :meth:`refresh` would eigendecompose.

        ``None`` when the refresh decomposes nothing a caller could batch with other blocks' (no
        factors yet, ``inverse='cholesky'``, or split factors, which :func:`split_eigh` batches
        itself). The names are those of the warnings a failure raises.
        """
        if self.A is None or self.inverse == "cholesky" or isinstance(self.A, SplitMatrix) \
                or isinstance(self.G, SplitMatrix):
            return None
        return (self.A, f"A of {self.name!r}"), (self.G, f"G of {self.name!r}")

    def refresh(self, decomposed: tuple[Any, Any] | None = None) -> bool:
        """Eigendecompose the current factors; on failure warn and keep the last good ones.

        With ``ekfac=True`` a new basis restarts the scalings from ``d_G d_Aᵀ``. Returns whether
        the decomposition was replaced. ``decomposed``: the results of
        :func:`~curvlab.kfac.inverse.safe_eigh_many` for :meth:`eigh_inputs` (``(d, U)`` or an
        :class:`~curvlab.kfac.inverse.EighError` each), computed by the engine in one batch
        with other blocks' factors of the same size; ``None`` decomposes here.
        """
        if self.A is None:
            return False
        if self.inverse == "cholesky":  # no eigendecomposition: factors kept for the inverses
            if not all(p.isfinite() if isinstance(p, SplitMatrix) else bool(
                    torch.isfinite(p).all()) for p in (self.A, self.G)):
                warnings.warn(f"K-FAC: factors of {self.name!r} are not finite; keeping the "
                              "previous inverse", RuntimeWarning, stacklevel=3)
                return False
            self.eig = FactorSnapshot(self.A, self.G)
            self._explicit.clear()
            self.stale = False
            return True

        def eigh(X, what):
            name = f"{what} of {self.name!r}"
            return split_eigh(X, name=name) if isinstance(X, SplitMatrix) else \
                safe_eigh(X, name=name)

        try:
            if decomposed is None:
                d_a, u_a = eigh(self.A, "A")
                d_g, u_g = eigh(self.G, "G")
            else:
                for part in decomposed:
                    if isinstance(part, EighError):
                        raise part
                (d_a, u_a), (d_g, u_g) = decomposed
        except EighError as err:
            warnings.warn(f"K-FAC: {err}; keeping the previous inverse", RuntimeWarning,
                          stacklevel=3)
            return False
        self.eig = Eigendecomposition(d_a, u_a, d_g, u_g)
        self._explicit.clear()
        if self.ekfac:
            self.scalings = torch.outer(d_g, d_a)
            self.scaling_updates = 0
        self.stale = False
        return True

    def pi_value(self) -> float:
        """π of the factored damping (trace norm from the cached eigenvalues, or the given π)."""
        if self.pi != "tracenorm":
            return float(self.pi)
        e = self._require_eig()
        if isinstance(e, FactorSnapshot):
            def tr(X):
                return float(X.trace() if isinstance(X, SplitMatrix) else torch.trace(X))
            ta, tg = tr(e.A) / e.A.shape[0], tr(e.G) / e.G.shape[0]
            return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        ta = float(e.eigenvalues_A.sum()) / e.eigenvalues_A.numel()
        tg = float(e.eigenvalues_G.sum()) / e.eigenvalues_G.numel()
        return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0

    def factored_damped(self, damping: float) -> tuple[Tensor, Tensor]:
        """The π-split damped factors ``(G + √λ/π I, A + π√λ I)`` (tests, small layers).

        Example:
            >>> from curvlab.kfac.layers import find_layers
            >>> block = KroneckerBlock(find_layers(torch.nn.Sequential(torch.nn.Linear(1, 1)))[0])
            >>> block.set_factors(torch.eye(2), torch.eye(1))
            >>> _ = block.refresh()
            >>> block.factored_damped(4.0)[0]
            tensor([[3.]])
        """
        root, pi = math.sqrt(damping), self.pi_value()
        A, G = (X.dense() if isinstance(X, SplitMatrix) else X for X in (self.A, self.G))
        eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        return G + root / pi * eye_g, A + pi * root * eye_a

    def explicit_inverses(self, damping: float) -> tuple[Tensor, Tensor]:
        """``((G + √λ/π I)⁻¹, (A + π√λ I)⁻¹)`` from the cached eigenbases (kept per damping)."""
        if damping not in self._explicit:
            e = self._require_eig()
            pi = self.pi_value()
            root = math.sqrt(damping)
            if len(self._explicit) > 4:
                self._explicit.clear()
            if isinstance(e, FactorSnapshot):  # Cholesky of the damped factors
                self._explicit[damping] = (
                    _cholesky_inverse(e.G, root / pi, f"G of {self.name!r}"),
                    _cholesky_inverse(e.A, pi * root, f"A of {self.name!r}"))
                return self._explicit[damping]
            d_g, d_a = e.eigenvalues_G + root / pi, e.eigenvalues_A + pi * root
            if bool((d_g <= 0).any()) or bool((d_a <= 0).any()):
                raise ValueError(f"K-FAC block {self.name!r}: damped factors are singular; use "
                                 "damping > 0")
            q_g, q_a = e.eigenvectors_G, e.eigenvectors_A
            self._explicit[damping] = ((q_g / d_g) @ q_g.mT, (q_a / d_a) @ q_a.mT)
        return self._explicit[damping]

    def _require_eig(self) -> Eigendecomposition:
        if self.eig is None:
            raise RuntimeError(f"K-FAC block {self.name!r} has no inverse yet (no refresh)")
        return self.eig

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the (undamped) block in the Kronecker eigenbasis, ``(out, in)``."""
        e = self._require_eig()
        if self.ekfac and self.scalings is not None:
            return self.scalings
        return torch.outer(e.eigenvalues_G, e.eigenvalues_A)

    def multiply(
        self, V: Tensor, power: int = -1, damping: float = 0.0, *,
        inverse: InverseKind | None = None,
    ) -> Tensor:
        r"""``(block + damping)^power`` applied to ``V`` of shape ``(..., out_dim, in_dim)``.

        ``power=1``: ``G V A + λ V`` (EKFAC: ``U_G [(U_Gᵀ V U_A) ⊙ S] U_Aᵀ + λ V``);
        ``power=-1``: the damped inverse of the kind ``inverse`` (default: the block's). The
        result has ``V``'s dtype; the work is done in the factors' dtype.
        """
        if power not in (1, -1):
            raise ValueError(f"power must be 1 or -1, got {power!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if tuple(V.shape[-2:]) != (self.layer.out_dim, self.layer.in_dim):
            raise ValueError(f"K-FAC block {self.name!r}: V must end in shape "
                             f"{(self.layer.out_dim, self.layer.in_dim)}, got {tuple(V.shape)}")
        kind = self.inverse if inverse is None else inverse
        check_inverse(kind, self.ekfac)
        if power == 1:
            if self.A is None:
                raise RuntimeError(f"K-FAC block {self.name!r} has no factors yet")
            vf = V.to(self.A.dtype)
            if self.ekfac:
                e = self._require_eig()
                q_g, q_a = e.eigenvectors_G, e.eigenvectors_A
                out = q_g @ ((q_g.mT @ vf @ q_a) * self.scalings) @ q_a.mT
            else:
                out = self.G @ vf @ self.A
            if damping:
                out = out + damping * vf
            return out.to(V.dtype)
        e = self._require_eig()
        vf = V.to(e[0].dtype if isinstance(e, FactorSnapshot) else e.eigenvectors_A.dtype)
        if kind == "eigen" and isinstance(e, FactorSnapshot):
            raise ValueError(f"K-FAC block {self.name!r} keeps no eigenbasis "
                             "(inverse='cholesky'); use inverse='factored' or 'cholesky'")
        if kind == "eigen":
            denom = self.eigenvalues() + damping
            if damping <= 0 and bool((denom <= 0).any()):  # d ≥ 0: only λ = 0 can fail
                raise ValueError(f"K-FAC block {self.name!r}: damping {damping} leaves a zero "
                                 "eigenvalue; use damping > 0")
            q_g, q_a = e.eigenvectors_G, e.eigenvectors_A
            out = q_g @ ((q_g.mT @ vf @ q_a) / denom) @ q_a.mT
        else:
            g_inv, a_inv = self.explicit_inverses(damping)
            out = g_inv @ vf @ a_inv
        return out.to(V.dtype)

    def to_dense(self, power: int = 1, damping: float = 0.0, *,
                 inverse: InverseKind | None = None) -> Tensor:
        """Dense ``(block + damping)^power`` in row-major order of ``[W | b]`` (small layers)."""
        n = self.layer.out_dim * self.layer.in_dim
        ref = self.A if self.A is not None else self._require_eig().eigenvectors_A
        eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
        cols = self.multiply(eye.reshape(n, self.layer.out_dim, self.layer.in_dim), power,
                             damping, inverse=inverse)
        return cols.reshape(n, n).T

    # ---- bookkeeping ---------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the factors and of the inverses (eigendecompositions, scalings, explicit)."""
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        factors = size([self.A, self.G])
        inv = [*(self.eig or ()), self.scalings]
        inv += [t for pair in self._explicit.values() for t in pair]
        return {"factors": factors, "inverses": size(inv)}

    def state_dict(self) -> dict[str, Any]:
        """Factors, counters, eigendecomposition and scalings (tensors cloned)."""
        def c(t):
            return None if t is None else t.clone()

        return {
            "A": c(self.A), "G": c(self.G), "updates": self.updates,
            "eig": None if self.eig is None else tuple(t.clone() for t in self.eig),
            "scalings": c(self.scalings), "scaling_updates": self.scaling_updates,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (shapes are checked against the layer)."""
        def c(t):
            return None if t is None else t.clone()

        shape_a = (self.layer.in_dim, self.layer.in_dim)
        shape_g = (self.layer.out_dim, self.layer.out_dim)
        for key, shape in (("A", shape_a), ("G", shape_g)):
            t = state[key]
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"K-FAC block {self.name!r}: saved {key} has shape "
                                 f"{tuple(t.shape)}, this layer needs {shape}")
        self.A, self.G = c(state["A"]), c(state["G"])
        self.updates = int(state["updates"])
        eig = state["eig"]
        if eig is None:
            self.eig = None
        else:
            cls = FactorSnapshot if len(eig) == 2 else Eigendecomposition
            self.eig = cls(*(t.clone() for t in eig))
        self.scalings = c(state["scalings"])
        self.scaling_updates = int(state["scaling_updates"])
        self.stale = bool(state["stale"])
        self._explicit.clear()

    def __repr__(self) -> str:
        split = "" if self.split_dim is None else f", split_dim={self.split_dim}"
        return (f"KroneckerBlock({self.name!r}, A={self.layer.in_dim}x{self.layer.in_dim}, "
                f"G={self.layer.out_dim}x{self.layer.out_dim}, inverse={self.inverse!r}, "
                f"ekfac={self.ekfac}{split}, updates={self.updates})")
