"""The block-tridiagonal chain half of :class:`~curvlab.kfac.KroneckerEngine`
(:class:`ChainMixin`: Martens & Grosse's inverse at the last refresh, products with the chain)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import Tensor

from curvlab.kfac.factors import KroneckerFactors
from curvlab.kfac.inverse import EighError
from curvlab.kfac.tridiagonal import TridiagonalFactors, TridiagonalInverse

__all__ = ["ChainMixin"]


class ChainMixin:
    """Needs the engine's ``layers``, ``blocks``, ``cross``, ``chain``, ``pi`` and
    ``_chain_inverses``."""

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
