r"""Block-split Kronecker factors (THOR's ``split_dim``, Chen et al. 2021).

A factor of size ``n > k`` is replaced by its block-diagonal part with diagonal blocks of size
``k`` (the last block holds the remaining ``n mod k`` rows, smaller; THOR pads instead, which
gives the same inverse on the unpadded part). :class:`SplitMatrix` stores only the blocks — a
stack ``(m, k, k)`` of the full ones plus the smaller tail — so memory, the eigendecomposition
(one batched ``eigh`` for the stack, one for the tail) and products with a gradient matrix all
grow linearly in ``n`` for fixed ``k``, not quadratically or cubically.

It supports what :class:`~curvlab.kfac.blocks.KroneckerBlock` does with a factor: linear
combinations (running averages), ``mT``, products with tensors on either side (``S @ V`` acts on
the second-to-last dimension of ``V``, ``V @ S`` on the last), products of two split matrices
with the same layout, column scaling by a vector (``S / d``), ``trace``, the Frobenius norm and
the guarded eigendecomposition :func:`split_eigh`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab.kfac.inverse import safe_eigh

__all__ = ["SplitMatrix", "split_eigh", "split_gram"]


@dataclass
class SplitMatrix:
    """Block-diagonal ``n × n`` matrix: ``m`` full blocks of size ``k``, then a tail block.

    Attributes:
        blocks: ``(m, k, k)`` (``m`` may be 0).
        tail: ``(r, r)`` with ``0 < r < k``, or ``None``.

    Example:
        >>> S = SplitMatrix.from_dense(torch.arange(25.0).reshape(5, 5), 2)
        >>> S.dense()
        tensor([[ 0.,  1.,  0.,  0.,  0.],
                [ 5.,  6.,  0.,  0.,  0.],
                [ 0.,  0., 12., 13.,  0.],
                [ 0.,  0., 17., 18.,  0.],
                [ 0.,  0.,  0.,  0., 24.]])
        >>> torch.allclose(torch.ones(1, 5) @ S, torch.ones(1, 5) @ S.dense())
        True
    """

    blocks: Tensor
    tail: Tensor | None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dense(cls, M: Tensor, k: int) -> SplitMatrix:
        """The block-diagonal part of a dense ``n × n`` matrix."""
        n = M.shape[-1]
        m, r = divmod(n, k)
        idx = torch.arange(m, device=M.device)
        full = M[: m * k, : m * k].reshape(m, k, m, k)[idx, :, idx, :] if m else \
            M.new_zeros(0, k, k)
        tail = M[m * k:, m * k:].clone() if r else None
        return cls(full.clone(), tail)

    @property
    def k(self) -> int:
        return int(self.blocks.shape[-1])

    @property
    def n(self) -> int:
        return self.blocks.shape[0] * self.k + (0 if self.tail is None else self.tail.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def parts(self) -> list[Tensor]:
        return [self.blocks] + ([] if self.tail is None else [self.tail])

    def _map(self, fn) -> SplitMatrix:
        return SplitMatrix(fn(self.blocks), None if self.tail is None else fn(self.tail))

    def _zip(self, other: SplitMatrix, fn) -> SplitMatrix:
        if other.blocks.shape != self.blocks.shape or (other.tail is None) != (self.tail is None):
            raise ValueError(f"SplitMatrix layouts differ: {self.layout()} vs {other.layout()}")
        tail = None if self.tail is None else fn(self.tail, other.tail)
        return SplitMatrix(fn(self.blocks, other.blocks), tail)

    def layout(self) -> str:
        r = 0 if self.tail is None else self.tail.shape[0]
        return f"{self.blocks.shape[0]}x{self.k}+{r}"

    def dense(self) -> Tensor:
        """The dense ``n × n`` matrix (tests, small factors)."""
        return torch.block_diag(*self.blocks.unbind(0), *([] if self.tail is None
                                                           else [self.tail]))

    # ---- tensor-like protocol ------------------------------------------------------------
    def clone(self) -> SplitMatrix:
        return self._map(torch.clone)

    def to(self, *args, **kwargs) -> SplitMatrix:
        return self._map(lambda t: t.to(*args, **kwargs))

    @property
    def mT(self) -> SplitMatrix:
        return self._map(lambda t: t.mT)

    def numel(self) -> int:
        return sum(t.numel() for t in self.parts())

    def element_size(self) -> int:
        return self.blocks.element_size()

    def __add__(self, other: SplitMatrix) -> SplitMatrix:
        return self._zip(other, torch.add)

    def __radd__(self, other):
        if isinstance(other, int | float) and other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: SplitMatrix) -> SplitMatrix:
        return self._zip(other, torch.sub)

    def __mul__(self, c: float) -> SplitMatrix:
        return self._map(lambda t: t * c)

    __rmul__ = __mul__

    def __truediv__(self, d: Tensor | float) -> SplitMatrix:
        """Divide by a scalar, or column ``j`` by ``d[j]`` for a vector ``d`` of length ``n``."""
        if not isinstance(d, Tensor) or d.dim() == 0:
            return self._map(lambda t: t / d)
        m, k = self.blocks.shape[0], self.k
        full = self.blocks / d[: m * k].reshape(m, 1, k)
        tail = None if self.tail is None else self.tail / d[m * k:]
        return SplitMatrix(full, tail)

    def __matmul__(self, other):
        if isinstance(other, SplitMatrix):
            return self._zip(other, torch.matmul)
        # S @ V: rows of V (its dim -2) in blocks
        m, k = self.blocks.shape[0], self.k
        head = other[..., : m * k, :]
        lead = head.shape[:-2]
        out = torch.einsum("bij,...bjq->...biq", self.blocks,
                           head.reshape(*lead, m, k, head.shape[-1]))
        out = out.reshape(*lead, m * k, head.shape[-1])
        if self.tail is not None:
            out = torch.cat([out, self.tail @ other[..., m * k:, :]], dim=-2)
        return out

    def __rmatmul__(self, other: Tensor) -> Tensor:
        # V @ S: columns of V (its last dim) in blocks
        m, k = self.blocks.shape[0], self.k
        head = other[..., : m * k]
        lead = head.shape[:-1]
        out = torch.einsum("...bi,bij->...bj", head.reshape(*lead, m, k), self.blocks)
        out = out.reshape(*lead, m * k)
        if self.tail is not None:
            out = torch.cat([out, other[..., m * k:] @ self.tail], dim=-1)
        return out

    def trace(self) -> Tensor:
        t = torch.diagonal(self.blocks, dim1=-2, dim2=-1).sum()
        return t if self.tail is None else t + torch.trace(self.tail)

    def norm(self) -> Tensor:
        """Frobenius norm."""
        sq = self.blocks.square().sum()
        return (sq if self.tail is None else sq + self.tail.square().sum()).sqrt()

    def isfinite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.parts())


def split_gram(X: Tensor, k: int) -> SplitMatrix:
    """Block-diagonal part of ``Xᵀ X`` for ``X`` of shape ``(rows, n)``, computed blockwise.

    Example:
        >>> X = torch.randn(7, 5)
        >>> torch.allclose(split_gram(X, 2).dense(), SplitMatrix.from_dense(X.T @ X, 2).dense())
        True
    """
    rows, n = X.shape
    m, r = divmod(n, k)
    head = X[:, : m * k].reshape(rows, m, k)
    full = torch.einsum("rbi,rbj->bij", head, head)
    tail = X[:, m * k:].T @ X[:, m * k:] if r else None
    return SplitMatrix(full, tail)


def split_eigh(S: SplitMatrix, *, name: str = "matrix") -> tuple[Tensor, SplitMatrix]:
    """Guarded eigendecomposition (:func:`~curvlab.kfac.inverse.safe_eigh`) of every block:
    one batched call for the full blocks, one for the tail. Returns ``(eigenvalues (n,),
    eigenvectors as a SplitMatrix)``.

    Example:
        >>> d, U = split_eigh(SplitMatrix.from_dense(torch.diag(torch.tensor([3., 1., 2.])), 2))
        >>> d
        tensor([1., 3., 2.])
    """
    d_full, u_full = safe_eigh(S.blocks, name=f"{name} (split blocks)") if S.blocks.shape[0] \
        else (S.blocks.new_zeros(0, S.k), S.blocks)
    if S.tail is None:
        return d_full.reshape(-1), SplitMatrix(u_full, None)
    d_tail, u_tail = safe_eigh(S.tail, name=f"{name} (split tail)")
    return torch.cat([d_full.reshape(-1), d_tail]), SplitMatrix(u_full, u_tail)
