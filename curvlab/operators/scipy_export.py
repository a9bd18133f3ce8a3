"""Export of a :class:`~curvlab.operators.base.LinearOperator` to SciPy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse.linalg

    from curvlab.operators.base import LinearOperator

__all__ = ["to_scipy"]


def to_scipy(op: LinearOperator) -> scipy.sparse.linalg.LinearOperator:
    """Wrap ``op`` as a :class:`scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out).

    NumPy inputs are converted to the operator's dtype and device (an explicit, documented
    cast, e.g. to float32), products run under ``torch.no_grad()``, and results come back
    as float64 NumPy arrays on the CPU. ``rmatvec``/``rmatmat`` use ``op.T`` when the
    operator has an adjoint; otherwise SciPy raises if they are called.

    Args:
        op: The operator.

    Returns:
        The SciPy operator of shape ``(P, P)`` and dtype ``float64``.

    Raises:
        ImportError: if SciPy is not installed.

    Example:
        >>> from curvlab.operators import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
        >>> to_scipy(A) @ np.ones(2)
        array([2., 3.])
    """
    try:
        from scipy.sparse.linalg import LinearOperator as SciPyLinearOperator
    except ImportError as err:  # pragma: no cover - scipy is installed in the test env
        raise ImportError(
            "LinearOperator.to_scipy() requires SciPy, which is not installed; install it "
            "with `pip install scipy` (part of the curvlab[experiments] extra)"
        ) from err
    p = op.shape[0]
    try:
        adjoint: LinearOperator | None = op.T
    except NotImplementedError:
        adjoint = None

    def make(target: LinearOperator) -> Any:
        def matmat(x: Any) -> np.ndarray:
            x = np.asarray(x)
            if np.iscomplexobj(x):
                raise TypeError("complex inputs are not supported by curvlab operators")
            one_d = x.ndim == 1
            mat = torch.tensor(x.reshape(p, -1), dtype=target.dtype, device=target.device)
            with torch.no_grad():
                out = target._apply_columns(mat)
            res = out.detach().to(device="cpu", dtype=torch.float64).numpy()
            return res.reshape(p) if one_d else res

        return matmat

    fwd = make(op)
    bwd = make(adjoint) if adjoint is not None else None
    return SciPyLinearOperator(
        shape=(p, p), matvec=fwd, matmat=fwd, rmatvec=bwd, rmatmat=bwd, dtype=np.float64
    )
