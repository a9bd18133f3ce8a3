"""Name-based access to every data set, with small "quick" sizes for CPU smoke runs.

=================  =====================  ===============  ==================================
name               full (train / test)    quick            source
=================  =====================  ===============  ==================================
digits             1500 / 297             1500 / 297       scikit-learn bundle (real)
mnist1d            4000 / 1000            1000 / 500       generated (:func:`make_mnist1d`)
curves             20000 / 10000          2000 / 1000      generated (:func:`make_curves`)
synthetic-cifar    50000 / 10000          1024 / 256       random, timing only
mnist              60000 / 10000          2000 / 1000      IDX files under ``CURVLAB_DATA``
fashion-mnist      60000 / 10000          2000 / 1000      IDX files under ``CURVLAB_DATA``
cifar10            50000 / 10000          2000 / 1000      pickle batches under ``CURVLAB_DATA``
=================  =====================  ===============  ==================================

``seed`` drives generation (mnist1d, curves, synthetic-cifar), the split (digits) and, for the
file-based sets in quick mode, the random subset (drawn with :func:`~curvlab.data.subsample`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from curvlab.data.cifar import load_cifar10
from curvlab.data.curves import make_curves
from curvlab.data.dataset import Dataset
from curvlab.data.digits import load_digits
from curvlab.data.idx import load_mnist
from curvlab.data.mnist1d import make_mnist1d
from curvlab.data.split import subsample
from curvlab.data.synthetic import make_synthetic_images

__all__ = ["DATASETS", "DatasetSpec", "get_dataset", "list_datasets"]


@dataclass(frozen=True)
class DatasetSpec:
    """Registry entry: how to build a data set and its full/quick sizes.

    Attributes:
        name: Registry name.
        description: One-line description.
        loader: Function returning a :class:`Dataset`.
        fixed: Keyword arguments always passed to ``loader``.
        full_sizes: ``(num_train, num_test)`` of the full set.
        quick_sizes: ``(num_train, num_test)`` in quick mode.
        from_files: Whether the data are read from disk (``root`` / ``CURVLAB_DATA``).
        generated_sizes: Whether ``loader`` takes ``num_train``/``num_test`` (generators) or the
            quick subset must be sub-sampled after loading.
    """

    name: str
    description: str
    loader: Callable[..., Dataset]
    fixed: dict[str, Any]
    full_sizes: tuple[int, int]
    quick_sizes: tuple[int, int]
    from_files: bool = False
    generated_sizes: bool = False


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits",
            "scikit-learn 8x8 digits, 10 classes (real data, bundled)",
            load_digits,
            {},
            (1500, 297),
            (1500, 297),
        ),
        DatasetSpec(
            "mnist1d",
            "MNIST-1D (Greydanus 2020), length-40 signals, 10 classes",
            make_mnist1d,
            {},
            (4000, 1000),
            (1000, 500),
            generated_sizes=True,
        ),
        DatasetSpec(
            "curves",
            "CURVES-like 28x28 curve images for auto-encoders",
            make_curves,
            {},
            (20000, 10000),
            (2000, 1000),
            generated_sizes=True,
        ),
        DatasetSpec(
            "synthetic-cifar",
            "random 3x32x32 images, 10 labels (timing only)",
            make_synthetic_images,
            {},
            (50000, 10000),
            (1024, 256),
            generated_sizes=True,
        ),
        DatasetSpec(
            "mnist",
            "MNIST from IDX files",
            load_mnist,
            {"kind": "mnist"},
            (60000, 10000),
            (2000, 1000),
            from_files=True,
        ),
        DatasetSpec(
            "fashion-mnist",
            "Fashion-MNIST from IDX files",
            load_mnist,
            {"kind": "fashion"},
            (60000, 10000),
            (2000, 1000),
            from_files=True,
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 from the python pickle batches",
            load_cifar10,
            {},
            (50000, 10000),
            (2000, 1000),
            from_files=True,
        ),
    )
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset`.

    Example:
        >>> "mnist1d" in list_datasets()
        True
    """
    return list(DATASETS)


def get_dataset(
    name: str,
    *,
    quick: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Dataset:
    """Build a registered data set by name (see the module table for names and sizes).

    Args:
        name: One of :func:`list_datasets`.
        quick: Use the small quick-mode sizes (generated sets are generated at that size;
            file-based sets are loaded, then a seeded random subset is kept).
        device: Device of the returned tensors.
        seed: Seed (generation, split, or quick subset; see the module docstring).
        dtype: Floating dtype of the inputs.
        **options: Extra keyword arguments of the underlying function, e.g. ``root=`` for the
            file-based sets or ``flatten=False``; unknown options raise ``ValueError``.

    Returns:
        The :class:`~curvlab.data.Dataset`.

    Raises:
        ValueError: Unknown ``name`` (the message lists the known names) or unknown option.
        FileNotFoundError: Missing files for a file-based set.

    Example:
        >>> ds = get_dataset("mnist1d", quick=True, seed=0)
        >>> ds.num_train, ds.num_test
        (1000, 500)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    spec = DATASETS[name]
    params = inspect.signature(spec.loader).parameters
    reserved = set(spec.fixed) | {"device", "dtype", "seed", "num_train", "num_test"}
    allowed = sorted(set(params) - reserved)
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise ValueError(
            f"get_dataset({name!r}) got unknown option(s) {bad}; accepted options: {allowed}"
        )
    kwargs: dict[str, Any] = {**spec.fixed, **options, "device": device, "dtype": dtype}
    if "seed" in params:
        kwargs["seed"] = seed
    if spec.generated_sizes:
        kwargs["num_train"], kwargs["num_test"] = spec.quick_sizes if quick else spec.full_sizes
        return spec.loader(**kwargs)
    dataset = spec.loader(**kwargs)
    if quick and spec.from_files:
        n_train = min(spec.quick_sizes[0], dataset.num_train)
        n_test = min(spec.quick_sizes[1], dataset.num_test)
        dataset = subsample(dataset, num_train=n_train, num_test=n_test, seed=seed)
    return dataset
