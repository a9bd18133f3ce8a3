"""Deterministic train/test splitting and sub-sampling.

All randomness comes from ``numpy.random.default_rng(seed)``, so a split depends only on the
seed and the number of examples (not on the device or dtype of the data).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from curvlab.data.dataset import Dataset, _check_count, _check_seed

__all__ = ["split_indices", "subsample", "train_test_split"]

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


def split_indices(num_examples: int, num_test: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Randomly partition ``range(num_examples)`` into train and test index arrays.

    Args:
        num_examples: Total number of examples ``N``.
        num_test: Size of the test part (``0 <= num_test <= N``).
        seed: Seed of the permutation.

    Returns:
        ``(train_idx, test_idx)``: disjoint ``int64`` arrays, each sorted ascending.

    Example:
        >>> tr, te = split_indices(10, 3, seed=0)
        >>> len(tr), len(te), sorted(set(tr) | set(te)) == list(range(10))
        (7, 3, True)
    """
    n = _check_count(num_examples, "num_examples")
    k = _check_count(num_test, "num_test")
    if k > n:
        raise ValueError(f"num_test={k} exceeds num_examples={n}")
    perm = np.random.default_rng(_check_seed(seed)).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _take(a: ArrayT, idx: np.ndarray) -> ArrayT:
    if isinstance(a, Tensor):
        return a[torch.as_tensor(idx, device=a.device)]
    return a[idx]


def train_test_split(
    x: ArrayT, y: ArrayT, *, num_test: int, seed: int
) -> tuple[ArrayT, ArrayT, ArrayT, ArrayT]:
    """Split paired arrays (numpy or torch) into ``(x_train, y_train, x_test, y_test)``.

    Examples keep their original relative order inside each part (indices are sorted).

    Example:
        >>> import numpy as np
        >>> xt, yt, xs, ys = train_test_split(np.arange(10), np.arange(10), num_test=4, seed=1)
        >>> xt.shape, xs.shape, bool((xt == yt).all())
        ((6,), (4,), True)
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    train_idx, test_idx = split_indices(len(x), num_test, seed=seed)
    return _take(x, train_idx), _take(y, train_idx), _take(x, test_idx), _take(y, test_idx)


def subsample(
    dataset: Dataset, *, num_train: int | None = None, num_test: int | None = None, seed: int = 0
) -> Dataset:
    """Return a random subset of a :class:`Dataset` (``None`` keeps a split whole).

    The subset is drawn without replacement with ``numpy.random.default_rng(seed)`` (independent
    draws for train and test) and keeps the original order of the chosen examples.

    Example:
        >>> import torch
        >>> from curvlab.data import make_synthetic_images
        >>> ds = make_synthetic_images(num_train=20, num_test=10, image_shape=(1, 2, 2))
        >>> small = subsample(ds, num_train=5, seed=0)
        >>> small.num_train, small.num_test
        (5, 10)
    """
    rng = np.random.default_rng(_check_seed(seed))
    parts = {}
    for split, n_keep in (("train", num_train), ("test", num_test)):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        if n_keep is None:
            parts[split] = (x, y)
            continue
        k = _check_count(n_keep, f"num_{split}")
        if k > x.shape[0]:
            raise ValueError(
                f"num_{split}={k} exceeds the {x.shape[0]} {split} examples of {dataset.name!r}"
            )
        idx = torch.as_tensor(
            np.sort(rng.choice(x.shape[0], size=k, replace=False)), device=x.device
        )
        xs = x[idx]
        parts[split] = (xs, xs if y is x else y[idx])
    return Dataset(
        *parts["train"],
        *parts["test"],
        name=dataset.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        task=dataset.task,
    )
