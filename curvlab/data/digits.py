"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set; real, no download)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from curvlab.data.dataset import Dataset, _check_count, as_dataset
from curvlab.data.split import train_test_split

__all__ = ["DIGITS_NUM_EXAMPLES", "load_digits"]

#: Number of images shipped with scikit-learn (``sklearn.datasets.load_digits``).
DIGITS_NUM_EXAMPLES = 1797


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images ``(1797, 8, 8)`` float64 and labels, read once per process (read-only arrays)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "curvlab.data.load_digits needs scikit-learn (it ships the digits data); install it "
            "with `pip install curvlab[experiments]`"
        ) from err
    bunch = _load()
    images = np.array(bunch.images, dtype=np.float64)
    labels = np.array(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(
    *,
    num_test: int = 297,
    seed: int = 0,
    flatten: bool = True,
    scale: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load the 1797 8x8 grayscale digit images bundled with scikit-learn.

    The split is a uniformly random permutation (``numpy.random.default_rng(seed)``) into
    ``1797 - num_test`` training and ``num_test`` test images; with the default ``num_test=297``
    that is 1500 / 297. scikit-learn is imported lazily.

    Args:
        num_test: Number of test images (0 to 1797).
        seed: Seed of the split.
        flatten: Return inputs of shape ``(N, 64)``; otherwise images ``(N, 1, 8, 8)``.
        scale: Divide the raw integer intensities (0..16) by 16, giving values in ``[0, 1]``.
        device: Device for all tensors.
        dtype: Floating dtype of the inputs (labels are ``int64``).

    Returns:
        A classification :class:`~curvlab.data.Dataset` named ``"digits"`` with 10 classes.

    Raises:
        ImportError: If scikit-learn is not installed.

    Example:
        >>> ds = load_digits(num_test=297, seed=0)
        >>> ds.num_train, ds.num_test, ds.input_shape, float(ds.x_train.max())
        (1500, 297, (64,), 1.0)
    """
    k = _check_count(num_test, "num_test")
    if k > DIGITS_NUM_EXAMPLES:
        raise ValueError(f"num_test must be <= {DIGITS_NUM_EXAMPLES}, got {k}")
    images, labels = _sklearn_digits()
    if scale:
        images = images / 16.0
    x = images.reshape(len(images), 64) if flatten else images[:, None, :, :]
    x_tr, y_tr, x_te, y_te = train_test_split(x, labels, num_test=k, seed=seed)
    return as_dataset(
        x_tr, y_tr, x_te, y_te, name="digits", num_classes=10, device=device, dtype=dtype
    )
