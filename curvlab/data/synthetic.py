"""Random CIFAR-shaped data for timing and memory benchmarks (no learnable structure)."""

from __future__ import annotations

import torch

from curvlab.data.dataset import Dataset, _check_count, _check_float_dtype, _check_seed, as_dataset

__all__ = ["make_synthetic_images"]


def make_synthetic_images(
    num_train: int = 50000,
    num_test: int = 10000,
    *,
    image_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Standard-normal images with uniformly random labels, **for timing only**.

    Inputs and labels are independent, so nothing can be learned beyond chance: use this to
    measure throughput, memory or curvature-product cost on CIFAR-shaped tensors without the
    real files (like the synthetic inputs of curvlinops' benchmarks). Data are drawn on the CPU
    from a ``torch.Generator`` seeded by ``seed`` (so they do not depend on the device) and then
    moved once.

    Args:
        num_train: Training examples (default 50000, as CIFAR-10).
        num_test: Test examples (default 10000).
        image_shape: Shape of one example (default ``(3, 32, 32)``).
        num_classes: Number of label values (default 10).
        seed: Seed of the generator.
        device: Device of the tensors.
        dtype: Floating dtype of the inputs.

    Returns:
        A classification :class:`~curvlab.data.Dataset` named ``"synthetic-cifar"``.

    Example:
        >>> ds = make_synthetic_images(num_train=4, num_test=2)
        >>> ds.x_train.shape, ds.num_classes
        (torch.Size([4, 3, 32, 32]), 10)
    """
    n_train = _check_count(num_train, "num_train")
    n_test = _check_count(num_test, "num_test")
    k = _check_count(num_classes, "num_classes", minimum=1)
    if not isinstance(image_shape, tuple | list) or not all(
        isinstance(s, int) and s > 0 for s in image_shape
    ):
        raise ValueError(f"image_shape must be a tuple of positive ints, got {image_shape!r}")
    gen = torch.Generator().manual_seed(_check_seed(seed))
    dt = _check_float_dtype(dtype)
    n = n_train + n_test
    x = torch.randn(n, *image_shape, generator=gen, dtype=dt)
    y = torch.randint(0, k, (n,), generator=gen)
    return as_dataset(
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        name="synthetic-cifar",
        num_classes=k,
        device=device,
        dtype=dt,
    )
