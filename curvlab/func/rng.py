"""Capturing and replaying the global RNG state, so a re-run forward draws the same random numbers.

Dropout inside a node the layer-wise engine differentiates with ``torch.func.jvp``, the
functional engine, the Hessian products and the optimizers all re-run a forward that must see
the dropout masks of an earlier one: they capture the state with :func:`rng_state` before the
first forward and run every later one under :func:`replay_rng`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["RngState", "replay_rng", "rng_state"]

#: ``(cpu_state, cuda_device_indices, cuda_states)``.
RngState = tuple[Tensor, list[int], list[Tensor]]


def _cuda_devices(tensors: Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def rng_state(tensors: Sequence[Tensor]) -> RngState:
    """Global RNG state of the CPU and of every CUDA device holding one of ``tensors``.

    Example:
        >>> state = rng_state([torch.zeros(1)])   # CPU tensors: the CPU state only
        >>> state[1]
        []
    """
    devices = _cuda_devices(tensors)
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices]


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNG set to ``state``; the RNG state is restored afterwards.

    Used to re-run a forward pass with the dropout masks of an earlier one.

    Example:
        >>> state = rng_state([])
        >>> first = torch.rand(1)
        >>> with replay_rng(state):
        ...     replayed = torch.rand(1)
        >>> torch.equal(first, replayed)
        True
        >>> torch.equal(torch.rand(1), first)  # restored afterwards: the stream continued
        False
    """
    cpu, devices, cuda = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda, strict=True):
            torch.cuda.set_rng_state(s, d)
        yield


def tensor_leaves(tree: object) -> list[Tensor]:
    """The tensors among the leaves of a pytree (for :func:`rng_state` of nested inputs)."""
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]
