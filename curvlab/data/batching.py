"""Mini-batching of device-resident tensors without :class:`torch.utils.data.DataLoader` overhead.

Batches are index slices of tensors that already live on the target device; shuffling draws one
permutation per pass from an explicit :class:`torch.Generator` (never the global RNG), so runs are
reproducible.  The permutation is drawn on the generator's device and then moved to the data's
device (for a CPU generator and CUDA data that is one small index copy per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from curvlab.data.dataset import _check_count, _check_seed

__all__ = ["MiniBatchLoader", "iterate_minibatches"]


def _check_pair(x: Tensor, y: Tensor) -> int:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    return int(x.shape[0])


def iterate_minibatches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs covering one pass (epoch) over ``(x, y)``.

    Args:
        x: Inputs with the examples along dim 0.
        y: Targets with the examples along dim 0 (same device as ``x``).
        batch_size: Examples per batch (positive).
        shuffle: Visit examples in a random order (needs ``generator``).
        generator: Source of the permutation; required when ``shuffle=True`` (no hidden use of
            the global RNG).
        drop_last: Drop a final batch smaller than ``batch_size``.

    Yields:
        Pairs of tensors; without shuffling they are views (slices) of ``x`` and ``y``.

    Example:
        >>> import torch
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> [len(b) for b, _ in iterate_minibatches(x, y, 4, shuffle=False)]
        [4, 4, 2]
        >>> g = torch.Generator().manual_seed(0)
        >>> sum(len(b) for b, _ in iterate_minibatches(x, y, 4, generator=g, drop_last=True))
        8
    """
    n = _check_pair(x, y)
    bs = _check_count(batch_size, "batch_size", minimum=1)
    if shuffle:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                "shuffle=True needs generator=<torch.Generator> (explicit source of randomness); "
                f"got {type(generator).__name__}"
            )
        perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    else:
        perm = None
    stop = (n // bs) * bs if drop_last else n
    return _batches(x, y, bs, n, stop, perm)


def _batches(
    x: Tensor, y: Tensor, bs: int, n: int, stop: int, perm: Tensor | None
) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, stop, bs):
        end = min(start + bs, n)
        if perm is not None:
            idx = perm[start:end]
            yield x[idx], y[idx]
        else:
            yield x[start:end], y[start:end]


class MiniBatchLoader:
    """A re-iterable, seeded mini-batch loader over device tensors.

    Each ``iter(loader)`` is one epoch; with ``shuffle=True`` every epoch draws a fresh permutation
    from the loader's own generator (seeded by ``seed``), so the sequence of epochs is
    reproducible. ``len(loader)`` is the number of batches per epoch. A loader is also a valid
    ``data`` argument wherever an iterable of ``(X, y)`` batches is expected.

    Args:
        x: Inputs, examples along dim 0.
        y: Targets, examples along dim 0.
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch.
        drop_last: Drop the last incomplete batch.
        seed: Seed of the loader's CPU :class:`torch.Generator`.

    Example:
        >>> import torch
        >>> loader = MiniBatchLoader(torch.randn(10, 3), torch.arange(10), batch_size=4, seed=0)
        >>> len(loader), [xb.shape[0] for xb, _ in loader]
        (3, [4, 4, 2])
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        self.num_examples = _check_pair(x, y)
        self.batch_size = _check_count(batch_size, "batch_size", minimum=1)
        if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
            raise TypeError("shuffle and drop_last must be bools")
        self.x, self.y = x, y
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = _check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.epoch += 1
        return iterate_minibatches(
            self.x,
            self.y,
            self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator if self.shuffle else None,
            drop_last=self.drop_last,
        )

    def reset(self) -> None:
        """Restart the shuffling sequence from ``seed`` (epoch counter back to 0)."""
        self.generator.manual_seed(self.seed)
        self.epoch = 0

    def __repr__(self) -> str:
        return (
            f"MiniBatchLoader(num_examples={self.num_examples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, seed={self.seed})"
        )
