"""Intra-op thread pinning for reproducible quick-mode numbers.

The number of intra-op threads changes the order of floating-point reductions, hence training
trajectories; quick-mode studies run on one thread so that ``python -m curvlab reproduce``,
the notebooks and the tests give identical numbers on any machine.

Example:
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with single_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

__all__ = ["quick_mode_threads", "single_thread"]


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (restored afterwards); a no-op when not ``enabled``.

    Tiny problems gain nothing from extra threads but overhead, and the thread count changes
    floating-point reduction order, hence training trajectories.

    Example:
        >>> with single_thread():
        ...     torch.get_num_threads()
        1
    """
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quick_mode_threads(full: bool) -> AbstractContextManager[None]:
    """Run quick mode on one intra-op thread; full mode keeps torch's default.

    The thread count changes floating-point reduction order, so training trajectories (and the
    ranking of close methods) would differ between machines and between ``python -m curvlab
    reproduce`` and the notebooks. Pinning one thread makes quick-mode numbers identical
    wherever they are produced.

    Example:
        >>> with quick_mode_threads(full=False):
        ...     torch.get_num_threads()
        1
    """
    return single_thread(enabled=not full)
