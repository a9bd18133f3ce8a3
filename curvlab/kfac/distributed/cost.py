r"""Cost model of distributed K-FAC: bytes per collective per rank and step, per-rank work.

:func:`step_cost` predicts, for one step that computes statistics and refreshes every inverse
(the worst step; stale steps skip the factor and eigen traffic), exactly what
:meth:`curvlab.KFACPreconditioner.comm_stats` counts (buffer bytes handed to each collective,
see :mod:`curvlab.kfac.distributed.comm`), and the per-rank work: inverse cost ``Σ in³ + out³``
of the layers a rank decomposes, preconditioning cost ``Σ 2·(out²·in + out·in²)`` of the layers
it preconditions, and factor / inverse memory in numbers. :data:`RESNET50` holds the 54
Kronecker layers of torchvision's ResNet-50 (``(name, in_dim, out_dim)`` with ``in_dim =
C_in·k·k`` (+1 for the fc bias); convolutions have no bias), written out from its definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from curvlab.kfac.distributed.assignment import assign_layers, grid_groups

__all__ = ["RESNET50", "resnet50_layers", "step_cost"]


def resnet50_layers() -> list[tuple[str, int, int]]:
    """``(name, in_dim, out_dim)`` of ResNet-50's convolutions and fc (torchvision layout).

    Example:
        >>> layers = resnet50_layers()
        >>> len(layers), layers[0], layers[-1]
        (54, ('conv1', 147, 64), ('fc', 2049, 1000))
    """
    out = [("conv1", 3 * 49, 64)]
    inplanes = 64
    for s, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{s}.{b}"
            out += [(f"{p}.conv1", inplanes, planes), (f"{p}.conv2", 9 * planes, planes),
                    (f"{p}.conv3", planes, 4 * planes)]
            if b == 0:
                out.append((f"{p}.downsample.0", inplanes, 4 * planes))
            inplanes = 4 * planes
    out.append(("fc", 2049, 1000))
    return out


RESNET50 = resnet50_layers()


def _sym(n: int, triu: bool) -> int:
    return n * (n + 1) // 2 if triu else n * n


def step_cost(layers: Sequence[tuple[str, int, int]], world: int, mode: str = "kaisa",
              fraction: float = 1.0, *, entry: str = "precond", extra_params: int = 0,
              elem_bytes: int = 4, symmetry_aware: bool = False,
              strategy: str = "compute", emulate: bool = False) -> list[dict[str, Any]]:
    """Per-rank prediction for one full step (statistics + every inverse refreshed).

    Args:
        layers: ``(name, in_dim, out_dim)`` per Kronecker layer (parameters ``in·out``).
        world, mode, fraction: As for :class:`~curvlab.kfac.distributed.DistributedKFAC`
            (``mode='sp-ngd'`` ignores ``fraction``).
        entry: ``'precond'`` (gradients averaged by DDP) or ``'optim'`` (in the all-reduce).
        extra_params: Numbers in parameters without a block (averaged by the entry point).
        elem_bytes: Bytes per number (4 float32, 8 float64); the skip flag is 4 bytes.
        emulate: SP-NGD's collectives as all-reduces of the packed buffers (no padding).

    Returns:
        One dict per rank: ``{"comm": {kind: {"calls", "bytes"}}, "inverse_work",
        "precondition_work", "factor_numbers", "inverse_numbers"}``.

    Example:
        >>> c = step_cost([("fc", 3, 2)], world=2)
        >>> c[0]["comm"]["all_reduce"]["bytes"]  # (3² + 2² + 1) float32 numbers
        56
    """
    dims = {n: (i, o) for n, i, o in layers}
    numel = {n: i * o for n, i, o in layers}
    fsum = sum(_sym(i, symmetry_aware) + _sym(o, symmetry_aware) for i, o in dims.values())
    eig = {n: 1 + i + i * i + o + o * o for n, (i, o) in dims.items()}
    pre = {n: 2 * (o * o * i + o * i * i) for n, (i, o) in dims.items()}
    inv = {n: i**3 + o**3 for n, (i, o) in dims.items()}
    fac = {n: i * i + o * o for n, (i, o) in dims.items()}
    out = []
    if mode == "sp-ngd":
        a = assign_layers(dims, world, 1.0 / world, strategy)
        light = min(range(world), key=lambda r: (a.loads[r], r))
        grads = [sum(numel[n] for n in a.layers_of(r)) + (extra_params if r == light else 0)
                 for r in range(world)]
        chunk = [grads[r] + sum(_sym(dims[n][0], symmetry_aware) + _sym(dims[n][1],
                                                                         symmetry_aware)
                                for n in a.layers_of(r)) + 1 for r in range(world)]
        if emulate:
            comm = {"all_reduce_flag": {"calls": 1, "bytes": 4},
                    "all_reduce": {"calls": 2, "bytes": (sum(chunk) + sum(grads)) * elem_bytes}}
        else:
            comm = {"all_reduce_flag": {"calls": 1, "bytes": 4},
                    "reduce_scatter": {"calls": 1, "bytes": world * max(chunk) * elem_bytes},
                    "all_gather": {"calls": 1, "bytes": world * max(grads) * elem_bytes}}
        for r in range(world):
            mine = a.layers_of(r)
            out.append({"comm": {k: dict(v) for k, v in comm.items()},
                        "inverse_work": sum(inv[n] for n in mine),
                        "precondition_work": sum(pre[n] for n in mine),
                        "factor_numbers": sum(fac[n] for n in mine),
                        "inverse_numbers": sum(eig[n] - 1 for n in mine)})
        return out
    columns, _ = grid_groups(world, fraction)
    a = assign_layers(dims, world, fraction, strategy)
    ar = fsum + 1 + (sum(numel.values()) + extra_params if entry == "optim" else 0)
    for r in range(world):
        comm = {"all_reduce_flag": {"calls": 1, "bytes": 4},
                "all_reduce": {"calls": 1, "bytes": ar * elem_bytes}}
        col = next(c for c, rs in enumerate(columns) if r in rs)
        col_layers = [n for n in dims if a.column[n] == col]
        if len(columns[col]) > 1:
            srcs = {a.inverse_worker[n] for n in col_layers}
            comm["broadcast"] = {"calls": len(srcs),
                                 "bytes": sum(eig[n] for n in col_layers) * elem_bytes}
        if len(columns) > 1:
            used = {a.column[n] for n in dims}
            b = comm.setdefault("broadcast", {"calls": 0, "bytes": 0})
            b["calls"] += len(used)
            b["bytes"] += sum(numel.values()) * elem_bytes
        out.append({"comm": comm,
                    "inverse_work": sum(inv[n] for n in a.layers_of(r)),
                    "precondition_work": sum(pre[n] for n in col_layers),
                    "factor_numbers": sum(fac.values()),
                    "inverse_numbers": sum(eig[n] - 1 for n in col_layers)})
    return out
