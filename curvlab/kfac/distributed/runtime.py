r"""Distributed K-FAC on ``torch.distributed``: KAISA's gradient workers and SP-NGD's owners.

:class:`DistributedKFAC` sits between an entry point (:class:`curvlab.KFACPreconditioner`,
:class:`curvlab.optim.KFACOptimizer`) and its :class:`~curvlab.kfac.KroneckerEngine`. Every
rank holds the same model and engine; the process group is the one the user created.

``mode='kaisa'`` (Pauloski et al., SC'21; spec §7). New factor statistics ``A``, ``G`` of the
local batch are averaged over the ranks, weighted by the local batch sizes (mean convention:
the result is the statistic of the global batch), in one bucketed asynchronous all-reduce, before
they enter the EMA on every rank (the optimizer puts its gradients in the same buffer; the
preconditioner expects gradients already averaged, e.g. by DDP). Inverses are computed by each
layer's inverse worker (:mod:`~curvlab.kfac.distributed.assignment`) and broadcast to its
column of gradient workers; gradient workers precondition, and the row's worker broadcasts the
preconditioned gradient to its receivers. ``grad_worker_fraction`` 1 = COMM-OPT, ``1/W`` =
MEM-OPT, between = HYBRID-OPT.

``mode='sp-ngd'`` (Osawa et al. 2020; spec §4 item 4). One ReduceScatterV of the packed
``[gradients, A, G]`` gives each rank the global means for the layers it owns (the MEM-OPT
grid); the owner updates the EMA, refreshes the inverse and preconditions; one AllGatherV
returns the preconditioned gradients (preconditioner) or the updated weights (optimizer, which
applies the update on the owner). Parameters without a block are averaged by one owner too.

Refresh policies (:mod:`curvlab.kfac.refresh`) decide identically on every rank (their
decisions depend on replicated factors; SP-NGD syncs :class:`AdaptiveRefresh`'s intervals after
each update, one small object all-gather), so stale statistics skip their collectives.
Limitations (raise): ``ekfac``, ``structure='block-tridiagonal'``; an eigendecomposition that
fails on its inverse worker is counted as refreshed by the other ranks' policies.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.kfac.blocks import Eigendecomposition, KroneckerBlock
from curvlab.kfac.distributed.assignment import Assignment, assign_layers
from curvlab.kfac.distributed.comm import CommStats, Communicator
from curvlab.kfac.distributed.state import (
    gather_engine_state,
    layer_parts,
    merge_policy,
    set_layer_parts,
)
from curvlab.kfac.engine import KroneckerEngine, LayerStatistics
from curvlab.kfac.refresh import (
    AdaptiveRefresh,
    FixedRefresh,
    FrequencyRefresh,
    RefreshPolicy,
    TraceRefresh,
)

__all__ = ["MODES", "DistributedKFAC", "run_step", "wants_distributed"]

MODES = ("kaisa", "sp-ngd")
# refresh policies take a layer's factors as one tuple (unit-wise blocks) or as A, G
_FACTOR_TUPLE = "factors" in inspect.signature(RefreshPolicy.inverse_due).parameters


def _factors(block: Any) -> tuple:
    return block.factors() if hasattr(block, "factors") else (block.A, block.G)


def _inverse_due(policy: RefreshPolicy, step: int, name: str, block: Any, updated: bool) -> bool:
    if _FACTOR_TUPLE:
        return policy.inverse_due(step, name, _factors(block), updated)
    return policy.inverse_due(step, name, block.A, block.G, updated)


def _observe_refresh(policy: RefreshPolicy, step: int, name: str, block: Any) -> None:
    if _FACTOR_TUPLE:
        policy.observe_refresh(step, name, _factors(block))
    else:
        policy.observe_refresh(step, name, block.A, block.G)


def wants_distributed(distributed: bool | None, mode: str | None, fraction: float | None,
                      group: Any, who: str) -> bool:
    """Whether an entry point runs distributed (``distributed=None``: when a process group of
    more than one rank is initialized, or any distributed option is given).

    Example:
        >>> wants_distributed(None, None, None, None, "demo")  # no process group here
        False
    """
    explicit = distributed is True or mode is not None or fraction is not None
    if distributed is False:
        if mode is not None or fraction is not None:
            raise ValueError(f"{who}: distributed=False conflicts with distributed_mode / "
                             "grad_worker_fraction")
        return False
    if distributed not in (None, True):
        raise TypeError(f"{who}: distributed must be None, True or False, got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if explicit and not ready:
        raise RuntimeError(f"{who}: distributed K-FAC options need a process group: call "
                           "torch.distributed.init_process_group() before constructing it")
    if not ready:
        return False
    return explicit or dist.get_world_size(group) > 1


class DistributedKFAC:
    """The collectives of one entry point's engine (see the module docstring).

    Args:
        engine: The entry point's engine (same layers on every rank; checked).
        params: ``{name: parameter}`` of the entry point, in its order.
        mode: ``'kaisa'`` or ``'sp-ngd'``.
        grad_worker_fraction: KAISA's ``f`` (default 1, COMM-OPT); ``f·W`` must divide ``W``.
        group: Process group (default: the default group).
        strategy: ``'compute'`` (``n³``) or ``'memory'`` (``n²``) layer costs.
        symmetry_aware: Send factors as upper triangles.
        bucket_cap_mb: Largest all-reduce buffer.
        emulate: Emulate reduce-scatter / all-gather by all-reduce (SP-NGD).
        who: Entry-point name for messages.

    Attributes:
        assignment: The :class:`~curvlab.kfac.distributed.assignment.Assignment`.
        comm: The :class:`~curvlab.kfac.distributed.comm.Communicator` (its ``stats``).
    """

    def __init__(self, engine: KroneckerEngine, params: Mapping[str, Tensor], *,
                 mode: str = "kaisa", grad_worker_fraction: float | None = None,
                 group: Any = None, strategy: str = "compute", symmetry_aware: bool = False,
                 bucket_cap_mb: float = 25.0, emulate: bool = False, who: str = "K-FAC") -> None:
        if mode not in MODES:
            raise ValueError(f"{who}: distributed_mode must be one of {MODES}, got {mode!r}")
        if engine.ekfac or engine.structure != "block-diagonal":
            raise ValueError(f"{who}: distributed K-FAC supports structure='block-diagonal' "
                             "without ekfac")
        self.engine, self.mode, self.who = engine, mode, who
        #: unit-wise normalization blocks: replicated (KAISA; statistics all-reduced)
        self.norm_layers = list(getattr(engine, "norm_layers", []))
        if self.norm_layers and mode == "sp-ngd":
            raise ValueError(f"{who}: distributed_mode='sp-ngd' does not own unit-wise "
                             f"normalization blocks ({[la.name for la in self.norm_layers]}); "
                             "use distributed_mode='kaisa' or exclude them with params=")
        self.params = dict(params)
        device = next(iter(self.params.values())).device
        self.comm = Communicator(group, bucket_cap_mb=bucket_cap_mb,
                                 symmetry_aware=symmetry_aware, emulate=emulate, device=device)
        self.group, self.rank, self.world = group, self.comm.rank, self.comm.world
        self._check_same_everywhere()
        if mode == "sp-ngd":
            if grad_worker_fraction not in (None, 1.0 / self.world):
                raise ValueError(f"{who}: distributed_mode='sp-ngd' owns each layer on one "
                                 "rank; grad_worker_fraction does not apply")
            fraction = 1.0 / self.world
        else:
            fraction = 1.0 if grad_worker_fraction is None else grad_worker_fraction
        self.layers = {la.name: la for la in engine.layers}
        dims = {la.name: (la.in_dim, la.out_dim) for la in engine.layers}
        try:
            self.assignment: Assignment = assign_layers(dims, self.world, fraction, strategy)
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        if mode == "sp-ngd":  # one owner per parameter: groups of a grouped conv stay together
            first: dict[str, int] = {}
            for la in engine.layers:
                first.setdefault(la.weight, self.assignment.inverse_worker[la.name])
                self.assignment.inverse_worker[la.name] = first[la.weight]
                self.assignment.column[la.name] = first[la.weight]
        self._subgroups()
        self.owner_of_param = self._param_owners()
        self.has_inverse: set[str] = {n for n, b in engine.blocks.items() if b.eig is not None}
        self._updated: set[str] = set()
        self.comm.stats = CommStats()  # count the steps' collectives only

    # ---- setup ---------------------------------------------------------------------------
    def _check_same_everywhere(self) -> None:
        sig = ([(la.name, la.kind, la.in_dim, la.out_dim, la.group) for la in self.engine.layers],
               [(n, tuple(p.shape), str(p.dtype)) for n, p in self.params.items()], self.mode)
        sigs = self.comm.all_gather_object(sig)
        bad = [r for r, s in enumerate(sigs) if s != sigs[0]]
        if bad:
            raise ValueError(f"{self.who}: ranks {bad} have other K-FAC layers / parameters / "
                             f"mode than rank 0 ({sigs[bad[0]][:1]} vs {sigs[0][:1]}); every "
                             "rank must build the same model and options")

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _subgroups(self) -> None:
        a = self.assignment
        self.column_groups: list[Any] = []
        self.row_groups: list[Any] = []
        for members, out in ((a.columns, self.column_groups), (a.rows, self.row_groups)):
            for ranks in members:  # every rank creates every group, in the same order
                if len(ranks) in (1, self.world):
                    out.append(self.group)
                else:
                    out.append(dist.new_group([self._global(r) for r in ranks]))
        self.my_column = next(c for c, rs in enumerate(a.columns) if self.rank in rs)
        self.my_row = a.row_of(self.rank)

    def _param_owners(self) -> dict[str, int]:
        owner: dict[str, int] = {}
        for la in self.engine.layers:
            for p in (la.weight, la.bias):
                if p is not None:
                    owner[p] = self.assignment.inverse_worker[la.name]
        rest = [n for n in self.params if n not in owner]
        if rest:
            lightest = min(range(self.world), key=lambda r: (self.assignment.loads[r], r))
            owner.update({n: lightest for n in rest})
        return {n: owner[n] for n in self.params}

    def owned_params(self, rank: int | None = None) -> list[str]:
        """Parameters whose averaged gradient and update ``rank`` owns (SP-NGD)."""
        r = self.rank if rank is None else rank
        return [n for n, o in self.owner_of_param.items() if o == r]

    def owned_layers(self, rank: int | None = None) -> list[str]:
        return self.assignment.layers_of(self.rank if rank is None else rank)

    # ---- steps ---------------------------------------------------------------------------
    def agree(self, ok: bool) -> bool:
        """Whether every rank's step is finite (all skip together)."""
        return self.comm.agree(ok)

    def _factor_list(self, stats: LayerStatistics, names: list[str]):
        items = []
        for name in names:
            for key, d in (("A", stats.A), ("G", stats.G), ("F", getattr(stats, "F", {}))):
                if name in d:
                    items.append((name, key, d[name]))
        return items

    def reduce(self, stats: LayerStatistics | None, grads: Mapping[str, Tensor] | None,
               ) -> tuple[LayerStatistics | None, dict[str, Tensor] | None]:
        """Averaged statistics (KAISA: all layers; SP-NGD: the owned layers) and gradients
        (KAISA: those given; SP-NGD: the owned parameters)."""
        if self.mode == "sp-ngd":
            return self._reduce_scatter(stats, grads)
        gnames = list(grads) if grads is not None else []
        names = [*self.layers, *(la.name for la in self.norm_layers)]
        items = self._factor_list(stats, names) if stats is not None else []
        n = float(stats.num_examples) if stats is not None else 0.0
        tensors = [grads[g] for g in gnames] + [n * t for _, _, t in items]
        sym = [False] * len(gnames) + [key != "F" for _, key, _ in items]
        if items:
            tensors.append(torch.tensor([n], dtype=items[0][2].dtype, device=items[0][2].device))
            sym.append(False)
        out = self.comm.all_reduce_sum(tensors, sym)
        new_grads = {g: t / self.world for g, t in zip(gnames, out, strict=False)}
        if stats is None:
            return None, new_grads if grads is not None else None
        total = out[-1] if items else None
        res = LayerStatistics(num_examples=int(total.item()) if total is not None else 0)
        for (name, key, _), t in zip(items, out[len(gnames):], strict=False):
            getattr(res, key)[name] = t / total
        return res, new_grads if grads is not None else None

    def _reduce_scatter(self, stats, grads):
        dtype = next(iter(self.engine.blocks.values())).layer.weight_param.dtype
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        n = float(stats.num_examples) if stats is not None else 0.0
        chunks, layouts = [], []
        for r in range(self.world):
            pn = self.owned_params(r)
            items = self._factor_list(stats, self.owned_layers(r)) if stats is not None else []
            ts = [grads[p].to(dtype) for p in pn] + [n * t for _, _, t in items]
            flats = self.comm.flatten(ts, [False] * len(pn) + [True] * len(items))
            flats.append(torch.tensor([n], dtype=dtype, device=self.comm.device))
            chunks.append(torch.cat(flats))
            layouts.append((pn, items, ts, flats))
        mine = self.comm.reduce_scatter(chunks)
        pn, items, ts, flats = layouts[self.rank]
        pieces = list(mine.split([f.numel() for f in flats]))
        total = pieces[-1]
        vals = self.comm.unflatten(pieces[:-1], ts, [False] * len(pn) + [True] * len(items))
        new_grads = {p: (v / self.world).to(grads[p].dtype)
                     for p, v in zip(pn, vals, strict=False)}
        if stats is None:
            return None, new_grads
        res = LayerStatistics(num_examples=int(total.item()))
        for (name, key, _), v in zip(items, vals[len(pn):], strict=True):
            getattr(res, key)[name] = v / total
        return res, new_grads

    def update(self, stats: LayerStatistics, step: int) -> None:
        """The EMA update of the averaged statistics (and SP-NGD's policy sync)."""
        self.engine.update(stats, step)
        self._updated = set(stats.A) | set(stats.G) | set(getattr(stats, "F", {}))
        if self.mode != "sp-ngd":
            return
        policy = self.engine.policy
        if isinstance(policy, FixedRefresh | FrequencyRefresh | TraceRefresh):
            return  # statistics decisions depend on the step only
        if isinstance(policy, AdaptiveRefresh):
            mine = {n: (dict(policy.intervals[n]), dict(policy.next_step[n]))
                    for n in self.owned_layers()}
            for part in self.comm.all_gather_object(mine):
                for n, (iv, nx) in part.items():
                    policy.intervals[n], policy.next_step[n] = iv, nx
            return
        owner = self.assignment.inverse_worker
        policy.load_state_dict(merge_policy(self.comm.all_gather_object(policy.state_dict()),
                                            owner))

    def refresh(self, step: int) -> int:
        """Refresh the due inverses (KAISA: on their inverse workers, broadcast to their
        columns; SP-NGD: the owner's); returns how many were due here."""
        if self.mode == "sp-ngd":
            return self.engine.refresh_due(step)
        eng, a = self.engine, self.assignment
        due = [n for n, b in eng.blocks.items() if b.has_factors
               and (b.stale or n not in self.has_inverse)
               and _inverse_due(eng.policy, step, n, b, n in self._updated)]
        ok = {n: bool(eng.blocks[n].refresh()) for n in due  # norm blocks: on every rank
              if a.inverse_worker.get(n, self.rank) == self.rank}
        if len(a.columns[self.my_column]) > 1:
            jobs, names = [], []
            for src in a.columns[self.my_column]:
                mine = [n for n in due if a.inverse_worker.get(n) == src]
                if not mine:
                    continue
                ts = []
                for n in mine:
                    ts += _eig_payload(eng.blocks[n], src == self.rank and ok[n])
                jobs.append((ts, self._global(src), self.column_groups[self.my_column]))
                names.append(mine)
            for mine, ts in zip(names, self.comm.broadcast_many(jobs), strict=True):
                for i, n in enumerate(mine):
                    flag, *eig = ts[5 * i:5 * i + 5]
                    if bool(flag.item()):  # the worker too: one memory layout everywhere
                        _set_eig(eng.blocks[n], Eigendecomposition(*eig))
        for n in due:
            eng.blocks[n].stale = False
            self.has_inverse.add(n)
            eng.layer_counters[n]["inverse_updates"] += 1
            _observe_refresh(eng.policy, step, n, eng.blocks[n])
        self._updated = set()
        return len(due)

    def precondition(self, grads: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """KAISA: the preconditioned gradients of every layer with an inverse, identical on
        every rank (SP-NGD: the owned layers', local)."""
        local = self.engine.precondition(grads, damping)
        if self.mode == "sp-ngd":
            return local
        a = self.assignment
        names = [n for n in self.layers if n in self.has_inverse]
        if len(a.rows[self.my_row]) > 1:
            jobs, cols = [], []
            for c, src in enumerate(a.rows[self.my_row]):
                mine = [n for n in names if a.column[n] == c]
                if not mine:
                    continue
                src_vals = local if src == self.rank else {}
                ts = [t for n in mine for t in layer_parts(self.layers[n], src_vals, grads)]
                jobs.append((ts, self._global(src), self.row_groups[self.my_row]))
                cols.append(mine)
            local = dict(local)
            for mine, ts in zip(cols, self.comm.broadcast_many(jobs), strict=True):
                for n in mine:
                    k = 2 if self.layers[n].bias is not None else 1
                    set_layer_parts(self.layers[n], local, grads, ts[:k])
                    ts = ts[k:]
        out: dict[str, Tensor] = {}
        for la in [*(self.layers[n] for n in names),
                   *(la for la in self.norm_layers if la.name in self.has_inverse)]:
            for p in (la.weight, la.bias):
                if p is not None:
                    out[p] = local.get(p, grads[p])
        return out

    def gather(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """SP-NGD's AllGatherV: every rank's owned ``values`` (one per owned parameter) for
        every parameter."""
        mine = self.owned_params()
        dtype = self.params[next(iter(self.params))].dtype
        flat = torch.cat([values[p].reshape(-1).to(dtype) for p in mine]) if mine else \
            torch.zeros(0, dtype=dtype, device=self.comm.device)
        sizes = [sum(self.params[p].numel() for p in self.owned_params(r))
                 for r in range(self.world)]
        out: dict[str, Tensor] = {}
        for r, part in enumerate(self.comm.all_gather(flat, sizes)):
            names = self.owned_params(r)
            for p, v in zip(names, part.split([self.params[p].numel() for p in names]),
                            strict=True):
                out[p] = v.reshape(self.params[p].shape).to(self.params[p].dtype)
        return out

    def end_step(self) -> None:
        self.comm.stats.end_step()

    def comm_stats(self) -> dict[str, Any]:
        """Bytes and calls per collective (total, per step, last step), with the mode."""
        return {"mode": self.mode, "world": self.world, "fraction": self.assignment.fraction,
                "symmetry_aware": self.comm.symmetry_aware, **self.comm.stats.summary()}

    # ---- checkpoints ---------------------------------------------------------------------
    def engine_state(self) -> dict[str, Any]:
        """The full engine state on every rank (a collective: every rank must call it)."""
        return gather_engine_state(self)

    def load_engine_state(self, state: Mapping[str, Any]) -> None:
        """Load a full engine state (any world size) and keep what this rank holds."""
        self.engine.load_state_dict(state)
        a = self.assignment
        for n, b in self.engine.blocks.items():
            if n not in a.inverse_worker:
                continue  # replicated unit-wise block
            keep_eig = self.rank in a.workers(n) if self.mode == "kaisa" else \
                a.inverse_worker[n] == self.rank
            st = b.state_dict()
            if self.mode == "sp-ngd" and a.inverse_worker[n] != self.rank:
                st["A"] = st["G"] = None
            if not keep_eig:
                st["eig"] = None
            b.load_state_dict(st)
        self.has_inverse = {n for n, s in state["blocks"].items() if s["eig"] is not None}

    def sync_param_state(self, state: Mapping[Tensor, dict[str, Any]]) -> None:
        """SP-NGD optimizer: copy each owned parameter's optimizer state (momentum) to every
        rank (collective; before a checkpoint)."""
        if self.mode != "sp-ngd":
            return
        mine = {n: dict(state[self.params[n]]) for n in self.owned_params()
                if self.params[n] in state}
        for part in self.comm.all_gather_object(mine):
            for n, s in part.items():
                state[self.params[n]].update({k: v.to(self.params[n].device)
                                              if isinstance(v, Tensor) else v
                                              for k, v in s.items()})


def _eig_payload(block: KroneckerBlock, have: bool) -> list[Tensor]:
    la = block.layer
    dtype = block.A.dtype
    dev = block.A.device
    if have:
        e = block.eig
        return [torch.ones(1, dtype=dtype, device=dev), *(t.to(dtype) for t in e)]
    i, o = la.in_dim, la.out_dim
    return [torch.zeros(1, dtype=dtype, device=dev), torch.zeros(i, dtype=dtype, device=dev),
            torch.zeros(i, i, dtype=dtype, device=dev), torch.zeros(o, dtype=dtype, device=dev),
            torch.zeros(o, o, dtype=dtype, device=dev)]


def _set_eig(block: KroneckerBlock, eig: Eigendecomposition) -> None:
    st = block.state_dict()
    st["eig"] = tuple(eig)
    st["stale"] = False
    block.load_state_dict(st)


def run_step(d: DistributedKFAC, step: int, stats: LayerStatistics | None,
             grads: Mapping[str, Tensor], damping: float, *, average_grads: bool = False,
             ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, bool, int]:
    """One distributed K-FAC step of an entry point: reduce, EMA, refresh, precondition.

    KAISA: ``grads`` are averaged first when ``average_grads`` (else they must be already,
    e.g. by DDP); SP-NGD: always averaged (reduce-scatter) and the result all-gathered. Returns
    ``(preconditioned {name: tensor}, averaged gradients or None, factors updated, refreshed)``;
    SP-NGD's result holds every parameter (the averaged gradient where no inverse applies).
    """
    spngd = d.mode == "sp-ngd"
    stats, avg = d.reduce(stats, grads if (average_grads or spngd) else None)
    if stats is not None and not stats.is_finite():
        warnings.warn(f"{d.who}: non-finite curvature statistics; factors not updated this "
                      "step", RuntimeWarning, stacklevel=3)
        stats = LayerStatistics()  # (empty: SP-NGD's policy sync still runs everywhere)
    updated = stats is not None and bool(stats.A or stats.G or getattr(stats, "F", None))
    if stats is not None:
        d.update(stats, step)
    refreshed = d.refresh(step)
    if spngd:
        pre = d.precondition(avg, damping)
        return d.gather({p: pre.get(p, avg[p]) for p in d.owned_params()}), avg, updated, \
            refreshed
    return d.precondition(avg if avg is not None else grads, damping), avg, updated, refreshed
