"""What every script in benchmarks/ shares (not a test): the two problems and a device sync.

* ``mlp``: 784-1000-500-250-10 tanh MLP, batch 512 (:func:`curvlab.problems.benchmark_mlp`).
* ``cnn``: 3c3d-like CNN on 3x32x32 inputs, batch 128 (:func:`curvlab.problems.cnn_3c3d`).

Each builder returns ``(model, input_shape, batch_size)`` with a seeded initialization, so every
script measures the same networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from curvlab.problems import benchmark_mlp, cnn_3c3d


def mlp(seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
    """Benchmark MLP, its input shape and batch size."""
    return benchmark_mlp(generator=torch.Generator().manual_seed(seed)), (784,), 512


def cnn(seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
    """3c3d-like CNN, its input shape and batch size."""
    return cnn_3c3d(generator=torch.Generator().manual_seed(seed)), (3, 32, 32), 128


MODELS: dict[str, Callable[..., tuple[nn.Module, tuple[int, ...], int]]] = {
    "mlp": mlp,
    "cnn": cnn,
}


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
