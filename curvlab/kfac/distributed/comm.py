r"""Bucketed ``torch.distributed`` collectives with byte and call counts (distributed K-FAC).

:class:`Communicator` wraps one process group. Every method flattens many tensors into one
buffer per collective (or per bucket of at most ``bucket_cap_mb``), issues the collectives
asynchronously, waits for all of them and unpacks. Symmetric tensors (Kronecker factors) can be
sent as their upper triangle (``symmetry_aware=True``: ``n(n+1)/2`` instead of ``n²`` numbers).

Counted bytes (:class:`CommStats`) are the size of the buffer this rank hands to the collective:
all-reduce and broadcast the buffer, reduce-scatter its input, all-gather its output (what the
cost model of :mod:`curvlab.kfac.distributed.cost` predicts). Reduce-scatter and all-gather use
the backend's native ``reduce_scatter_single`` / ``all_gather_single`` (older torch:
``reduce_scatter_tensor`` / ``all_gather_into_tensor``; gloo supports both for ``SUM`` on
CPU tensors in torch ≥ 2.2), on chunks padded to the largest rank's chunk; with
``emulate=True`` they are an all-reduce of the zero-filled packed buffer (chainerkfac's way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "Communicator", "pack_triu", "unpack_triu"]


def pack_triu(t: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row.

    Example:
        >>> pack_triu(torch.tensor([[1., 2.], [2., 3.]]))
        tensor([1., 2., 3.])
    """
    n = t.shape[-1]
    i, j = torch.triu_indices(n, n, device=t.device)
    return t[i, j]


def unpack_triu(flat: Tensor, n: int) -> Tensor:
    """The symmetric ``n × n`` matrix whose upper triangle is ``flat`` (:func:`pack_triu`).

    Example:
        >>> unpack_triu(torch.tensor([1., 2., 3.]), 2)
        tensor([[1., 2.],
                [2., 3.]])
    """
    i, j = torch.triu_indices(n, n, device=flat.device)
    out = flat.new_zeros(n, n)
    out[i, j] = flat
    out[j, i] = flat
    return out


class CommStats:
    """Calls and bytes per collective kind, in total and for the current/last step.

    Example:
        >>> s = CommStats()
        >>> s.record("all_reduce", 80); s.end_step()
        >>> s.summary()["per_step"]["all_reduce"]
        {'calls': 1.0, 'bytes': 80.0}
    """

    def __init__(self) -> None:
        self.total: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
        self.current: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
        self.last: dict[str, dict[str, int]] = {}
        self.steps = 0

    def record(self, kind: str, nbytes: int, calls: int = 1) -> None:
        for d in (self.total, self.current):
            d[kind]["calls"] += calls
            d[kind]["bytes"] += int(nbytes)

    def end_step(self) -> None:
        self.last = {k: dict(v) for k, v in self.current.items()}
        self.current.clear()
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        """``{"steps", "total", "per_step" (total / steps), "last_step"}``."""
        n = max(self.steps, 1)
        return {"steps": self.steps,
                "total": {k: dict(v) for k, v in self.total.items()},
                "per_step": {k: {"calls": v["calls"] / n, "bytes": v["bytes"] / n}
                             for k, v in self.total.items()},
                "last_step": {k: dict(v) for k, v in self.last.items()}}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """Bucketed asynchronous collectives on ``group`` (see the module docstring).

    Args:
        group: The process group (``None``: the default group).
        bucket_cap_mb: Largest buffer per collective (a bigger tensor gets its own bucket).
        symmetry_aware: Send symmetric tensors as upper triangles.
        emulate: Emulate reduce-scatter / all-gather with all-reduce.
        device: Where small control tensors live (the parameters' device; CUDA for NCCL).
    """

    def __init__(self, group: Any = None, *, bucket_cap_mb: float = 25.0,
                 symmetry_aware: bool = False, emulate: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.cap = int(bucket_cap_mb * 2**20)
        self.symmetry_aware = bool(symmetry_aware)
        self.emulate = bool(emulate)
        self.stats = CommStats()
        self._rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    # ---- packing -------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor], symmetric: Sequence[bool]) -> list[Tensor]:
        """Flat pieces (upper triangles where ``symmetric`` and ``symmetry_aware``)."""
        return [pack_triu(t) if s and self.symmetry_aware else t.reshape(-1)
                for t, s in zip(tensors, symmetric, strict=True)]

    def unflatten(self, flats: Sequence[Tensor], like: Sequence[Tensor],
                  symmetric: Sequence[bool]) -> list[Tensor]:
        return [unpack_triu(f, t.shape[-1]) if s and self.symmetry_aware else f.reshape(t.shape)
                for f, t, s in zip(flats, like, symmetric, strict=True)]

    def _buckets(self, flats: Sequence[Tensor]) -> list[list[int]]:
        buckets: list[list[int]] = []
        size, dtype = 0, None
        for i, f in enumerate(flats):
            if not buckets or f.dtype != dtype or size + _nbytes(f) > self.cap:
                buckets.append([])
                size, dtype = 0, f.dtype
            buckets[-1].append(i)
            size += _nbytes(f)
        return buckets

    # ---- collectives ---------------------------------------------------------------------
    def all_reduce_sum(self, tensors: Sequence[Tensor],
                       symmetric: Sequence[bool] | None = None) -> list[Tensor]:
        """Sum of each tensor over the ranks (new tensors), bucketed and asynchronous."""
        if not tensors:
            return []
        sym = symmetric if symmetric is not None else [False] * len(tensors)
        flats = self.flatten(tensors, sym)
        works, bufs = [], []
        for idx in self._buckets(flats):
            buf = torch.cat([flats[i] for i in idx])
            works.append(dist.all_reduce(buf, group=self.group, async_op=True))
            bufs.append((idx, buf))
            self.stats.record("all_reduce", _nbytes(buf))
        for w in works:
            w.wait()
        out: list[Tensor | None] = [None] * len(flats)
        for idx, buf in bufs:
            for i, piece in zip(idx, buf.split([flats[i].numel() for i in idx]), strict=True):
                out[i] = piece
        return self.unflatten(out, tensors, sym)

    def broadcast(self, tensors: Sequence[Tensor], src: int, group: Any = None) -> list[Tensor]:
        """``src``'s tensors on every rank of ``group`` (one buffer; ``tensors`` give the
        shapes and dtype on the receivers)."""
        if not tensors:
            return []
        buf = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(buf, src=src, group=group)
        self.stats.record("broadcast", _nbytes(buf))
        return [p.reshape(t.shape) for p, t in zip(buf.split([t.numel() for t in tensors]),
                                                    tensors, strict=True)]

    def broadcast_many(self, jobs: Sequence[tuple[list[Tensor], int, Any]]) -> list[list[Tensor]]:
        """Several broadcasts ``(tensors, src, group)`` issued asynchronously, then awaited."""
        works, bufs = [], []
        for tensors, src, group in jobs:
            buf = torch.cat([t.reshape(-1) for t in tensors])
            works.append(dist.broadcast(buf, src=src, group=group, async_op=True))
            bufs.append(buf)
            self.stats.record("broadcast", _nbytes(buf))
        for w in works:
            w.wait()
        return [[p.reshape(t.shape) for p, t in zip(buf.split([t.numel() for t in ts]), ts,
                                                    strict=True)]
                for buf, (ts, _, _) in zip(bufs, jobs, strict=True)]

    def reduce_scatter(self, chunks: Sequence[Tensor]) -> Tensor:
        """ReduceScatterV: ``chunks[r]`` (1-D, one dtype) summed over ranks arrives at rank
        ``r``; returns this rank's summed chunk."""
        sizes = [c.numel() for c in chunks]
        if self.emulate:
            buf = torch.cat(list(chunks))
            dist.all_reduce(buf, group=self.group)
            self.stats.record("all_reduce", _nbytes(buf))
            start = sum(sizes[:self.rank])
            return buf[start:start + sizes[self.rank]]
        m = max(sizes)
        buf = torch.cat([torch.cat([c, c.new_zeros(m - c.numel())]) for c in chunks])
        out = buf.new_empty(m)
        self._rs(out, buf, group=self.group)
        self.stats.record("reduce_scatter", _nbytes(buf))
        return out[:sizes[self.rank]]

    def all_gather(self, mine: Tensor, sizes: Sequence[int]) -> list[Tensor]:
        """AllGatherV: every rank's 1-D chunk (``sizes[r]`` numbers from rank ``r``)."""
        if self.emulate:
            start = sum(sizes[:self.rank])
            buf = mine.new_zeros(sum(sizes))
            buf[start:start + mine.numel()] = mine
            dist.all_reduce(buf, group=self.group)
            self.stats.record("all_reduce", _nbytes(buf))
            return list(buf.split(list(sizes)))
        m = max(sizes)
        out = mine.new_empty(m * self.world)
        self._ag(out, torch.cat([mine, mine.new_zeros(m - mine.numel())]), group=self.group)
        self.stats.record("all_gather", _nbytes(out))
        return [out[r * m:r * m + s] for r, s in enumerate(sizes)]

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce of one number)."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag, group=self.group)
        self.stats.record("all_reduce_flag", _nbytes(flag))
        return bool(flag.item() == 0.0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` (checks, checkpoints, policy state)."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        self.stats.record("all_gather_object", 0)
        return out
