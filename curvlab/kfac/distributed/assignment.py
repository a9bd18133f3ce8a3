r"""KAISA's work assignment: gradient-worker grid and greedy layer placement by cost.

With ``W`` ranks and ``grad_worker_fraction = f`` there are ``k = f·W`` gradient workers per
layer. Ranks form a grid of ``k`` rows × ``W/k`` columns (rank ``i·(W/k) + j`` in row ``i``,
column ``j``). **Gradient-worker groups are the columns** (``k`` ranks that hold a layer's
inverse and precondition it; the layer's inverse worker computes it and broadcasts it to its
column), **receiver groups are the rows** (the row's member of the layer's column broadcasts the
preconditioned gradient to the rest of the row). ``f = 1`` (COMM-OPT): one column, every rank
preconditions every layer; ``f = 1/W`` (MEM-OPT): one row, one rank per layer; between:
HYBRID-OPT. SP-NGD's layer ownership is the MEM-OPT grid.

Layers are placed greedily, most expensive first, on the least loaded column and within it on
the least loaded rank; a layer's cost is ``in³ + out³`` (``'compute'``, the eigendecompositions)
or ``in² + out²`` (``'memory'``, the factors and their inverses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Assignment", "assign_layers", "grid_groups", "layer_cost"]


def grid_groups(world: int, fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """``(worker groups = columns, receiver groups = rows)`` of KAISA's grid.

    Raises ``ValueError`` when ``fraction·world`` is not a whole divisor of ``world``.

    Example:
        >>> grid_groups(8, 0.25)[0]
        [[0, 4], [1, 5], [2, 6], [3, 7]]
        >>> grid_groups(8, 0.25)[1]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not 0 < fraction <= 1:
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {fraction!r}")
    k = round(world * fraction)
    if k < 1 or abs(k - world * fraction) > 1e-9 or world % k:
        raise ValueError(
            f"grad_worker_fraction={fraction} with world size {world} gives "
            f"{world * fraction:g} gradient workers per layer; it must be a whole divisor of "
            f"{world} (equal worker groups), e.g. one of "
            f"{[f'{d}/{world}' for d in range(1, world + 1) if world % d == 0]}")
    cols = world // k
    rows = [[i * cols + j for j in range(cols)] for i in range(k)]
    columns = [[i * cols + j for i in range(k)] for j in range(cols)]
    return columns, rows


def layer_cost(in_dim: int, out_dim: int, strategy: str = "compute") -> float:
    """Estimated cost of a layer's inverse: ``in³ + out³`` or ``in² + out²``.

    Example:
        >>> layer_cost(3, 2), layer_cost(3, 2, "memory")
        (35.0, 13.0)
    """
    if strategy == "compute":
        return float(in_dim**3 + out_dim**3)
    if strategy == "memory":
        return float(in_dim**2 + out_dim**2)
    raise ValueError(f"assignment strategy must be 'compute' or 'memory', got {strategy!r}")


@dataclass
class Assignment:
    """Which rank does what for every layer (inspect as ``precond.assignment``).

    Attributes:
        world, fraction: Ranks and gradient-worker fraction.
        columns, rows: Gradient-worker and receiver groups (:func:`grid_groups`).
        inverse_worker: ``{layer: rank}`` computing (and, with ``k > 1``, broadcasting) the
            layer's inverse — in SP-NGD the layer's owner.
        column: ``{layer: column index}``.
        loads: Summed cost per rank.
    """

    world: int
    fraction: float
    columns: list[list[int]]
    rows: list[list[int]]
    inverse_worker: dict[str, int] = field(default_factory=dict)
    column: dict[str, int] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)

    def workers(self, name: str) -> list[int]:
        """The gradient workers of layer ``name`` (its column)."""
        return self.columns[self.column[name]]

    def row_of(self, rank: int) -> int:
        return next(i for i, r in enumerate(self.rows) if rank in r)

    def src_for(self, name: str, rank: int) -> int:
        """The gradient worker of ``name`` in ``rank``'s row (sends it the gradient)."""
        return self.rows[self.row_of(rank)][self.column[name]]

    def layers_of(self, rank: int) -> list[str]:
        """Layers whose inverse ``rank`` computes."""
        return [n for n, r in self.inverse_worker.items() if r == rank]

    def table(self) -> list[dict[str, object]]:
        """Tidy rows ``{"layer", "inverse_worker", "workers"}``."""
        return [{"layer": n, "inverse_worker": r, "workers": self.workers(n)}
                for n, r in self.inverse_worker.items()]


def assign_layers(dims: Mapping[str, tuple[int, int]] | Sequence[tuple[str, int, int]],
                  world: int, fraction: float = 1.0, strategy: str = "compute") -> Assignment:
    """Greedy placement of layers ``{name: (in_dim, out_dim)}`` on KAISA's grid.

    Every layer is placed exactly once (ties: lowest column / rank; equal costs keep the layer
    order).

    Example:
        >>> a = assign_layers({"fc1": (785, 64), "fc2": (65, 10)}, world=2, fraction=0.5)
        >>> a.inverse_worker
        {'fc1': 0, 'fc2': 1}
    """
    items = list(dims.items()) if isinstance(dims, Mapping) else [
        (n, (i, o)) for n, i, o in dims]
    columns, rows = grid_groups(world, fraction)
    loads = [0.0] * world
    out = Assignment(world, float(fraction), columns, rows)
    order = sorted(range(len(items)), key=lambda i: -layer_cost(*items[i][1], strategy))
    placed: dict[str, int] = {}
    for i in order:
        name, (din, dout) = items[i]
        if name in placed:
            raise ValueError(f"layer {name!r} is listed twice")
        cost = layer_cost(din, dout, strategy)
        col = min(range(len(columns)), key=lambda c: (sum(loads[r] for r in columns[c]), c))
        rank = min(columns[col], key=lambda r: (loads[r], r))
        loads[rank] += cost
        placed[name] = rank
        out.column[name] = col
    out.inverse_worker = {name: placed[name] for name, _ in items}
    out.column = {name: out.column[name] for name, _ in items}
    out.loads = loads
    return out
