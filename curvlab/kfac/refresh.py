r"""When statistics are recomputed and inverses refreshed: pluggable refresh policies.

A policy decides, per layer and step, which factors get new statistics (``A``, ``G``) and
whether the layer's inverse (eigendecomposition) is refreshed. Whatever a step does not refresh
it does not compute: an entry point skips the factor products of layers that are not due, and
the sampled backward pass when no layer needs a new ``G``. Steps are counted from 0.

* :class:`FixedRefresh` — K-FAC's fixed intervals (the default everywhere): statistics every
  ``cov_interval`` steps, inverses every ``inv_interval`` steps and on the first
  ``num_forced_inverses`` steps.
* :class:`AdaptiveRefresh` — SP-NGD's stale statistics (Osawa et al. 2020): when a factor ``X``
  is recomputed it is compared with its value before the update,
  ``‖X_new − X‖_F / ‖X‖_F < alpha`` ⇒ "similar" and that factor's interval grows (``'add1'``:
  +1, ``'double'``: ×2, at most ``max_interval``), otherwise it shrinks (``'reset'``: to 1,
  ``'halve'``: ÷2); a layer's inverse is refreshed on the steps that updated one of its factors.
* :class:`TraceRefresh` — THOR's trace rule (Chen et al. 2021): statistics every step; a layer's
  inverse refresh is skipped while the relative change of both factors' traces since its last
  refresh is below ``omega``.
* :class:`FrequencyRefresh` — the schedule of THOR's released code: one step that recomputes
  statistics and inverses, then ``frequency − 1`` steps on the stale inverses.

Every policy keeps ``refresh_log`` (tidy rows ``{"step", "layer", "what", "interval"}``, ``what``
in ``"A"``, ``"G"``, ``"inverse"``) and per-layer counts, and has a ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdaptiveRefresh", "FixedRefresh", "FrequencyRefresh", "RefreshPolicy",
           "TraceRefresh"]


def _fro(X) -> float:
    """Frobenius norm of a tensor or a split factor."""
    return float(X.norm()) if hasattr(X, "parts") else float(torch.linalg.vector_norm(X))


def _trace(X) -> float:
    if hasattr(X, "parts"):
        return float(X.trace())
    return float(torch.diagonal(X, dim1=-2, dim2=-1).sum())  # batched unit-wise blocks too


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _positive_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class RefreshPolicy:
    """Base class: every factor and inverse refreshed every step (subclasses override).

    Call order per step ``k`` (done by the entry points): :meth:`stats_due` →
    (statistics) → :meth:`observe_update` per updated factor → :meth:`inverse_due` →
    (refresh) → :meth:`observe_refresh`.

    Example (a custom policy: statistics on even steps only):
        >>> class EvenSteps(RefreshPolicy):
        ...     def stats_due(self, step, name):
        ...         return step % 2 == 0, step % 2 == 0
        >>> p = EvenSteps()
        >>> p.bind(["fc"])
        >>> [p.stats_due(k, "fc")[0] for k in range(3)]
        [True, False, True]
    """

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.unitwise: set[str] = set()
        self.refresh_log: list[dict[str, Any]] = []
        self.counts: dict[str, dict[str, int]] = {}

    def bind(self, layers: Sequence[str], unitwise: Sequence[str] = ()) -> None:
        """Attach to an entry point's layers (names); ``unitwise``: those with one unit-wise
        factor ``F`` instead of ``(A, G)``."""
        if self.layers and list(layers) != self.layers:
            raise ValueError(f"{type(self).__name__} is already bound to layers {self.layers}, "
                             f"not {list(layers)}; use one policy object per optimizer")
        self.layers = list(layers)
        self.unitwise = set(unitwise)
        for name in self.layers:
            self.counts.setdefault(name, {"A": 0, "G": 0, "F": 0, "inverse": 0})

    # ---- decisions -----------------------------------------------------------------------
    def stats_due(self, step: int, name: str) -> tuple[bool, bool]:
        """Whether layer ``name`` gets new ``(A, G)`` statistics at ``step``."""
        return True, True

    def inverse_due(self, step: int, name: str, factors: tuple, updated: bool) -> bool:
        """Whether layer ``name``'s inverse is refreshed at ``step`` (``factors``: the layer's
        current factors, ``(A, G)`` or a unit-wise block's ``(F,)``; ``updated``: they changed
        this step)."""
        return True

    # ---- observations --------------------------------------------------------------------
    def observe_update(self, step: int, name: str, factor: str, old: Tensor | None,
                       new: Tensor) -> None:
        """A factor (``'A'``, ``'G'``, or a unit-wise ``'F'``) of ``name`` was recomputed:
        ``old`` before, ``new`` the new statistics."""
        self.counts[name][factor] += 1
        self.refresh_log.append({"step": step, "layer": name, "what": factor,
                                 "interval": self.interval(name, factor)})

    def observe_refresh(self, step: int, name: str, factors: tuple) -> None:
        """Layer ``name``'s inverse was refreshed from ``factors``."""
        self.counts[name]["inverse"] += 1
        self.refresh_log.append({"step": step, "layer": name, "what": "inverse",
                                 "interval": self.interval(name, "inverse")})

    def interval(self, name: str, what: str) -> int:
        """The current interval of ``what`` for layer ``name`` (for the log)."""
        return 1

    # ---- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "layers": list(self.layers),
                "refresh_log": [dict(r) for r in self.refresh_log],
                "counts": {n: dict(c) for n, c in self.counts.items()}, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["type"] != type(self).__name__:
            raise ValueError(f"refresh policy state is for {state['type']}, this is "
                             f"{type(self).__name__}")
        if self.layers and state["layers"] != self.layers:
            missing = sorted(set(self.layers) - set(state["layers"]))
            unknown = sorted(set(state["layers"]) - set(self.layers))
            raise ValueError(f"refresh policy state is for other layers (missing: {missing}, "
                             f"unknown: {unknown})")
        self.layers = list(state["layers"])
        self.refresh_log = [dict(r) for r in state["refresh_log"]]
        self.counts = {n: dict(c) for n, c in state["counts"].items()}
        self._load_extra(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def _params(self) -> dict[str, Any]:
        return {}


class FixedRefresh(RefreshPolicy):
    """Statistics every ``cov_interval`` steps, inverses every ``inv_interval`` steps and on the
    first ``num_forced_inverses`` steps (K-FAC's defaults: 1, 20, 3).

    Example:
        >>> p = FixedRefresh(cov_interval=2, inv_interval=4, num_forced_inverses=0)
        >>> p.bind(["fc"])
        >>> [p.stats_due(k, "fc")[0] for k in range(5)]
        [True, False, True, False, True]
        >>> [p.inverse_due(k, "fc", (), True) for k in range(5)]
        [True, False, False, False, True]
    """

    def __init__(self, cov_interval: int = 1, inv_interval: int = 20,
                 num_forced_inverses: int = 3) -> None:
        super().__init__()
        self.cov_interval = _positive_int("cov_interval", cov_interval)
        self.inv_interval = _positive_int("inv_interval", inv_interval)
        self.num_forced_inverses = _positive_int("num_forced_inverses", num_forced_inverses, 0)

    def stats_due(self, step, name):
        due = step % self.cov_interval == 0
        return due, due

    def inverse_due(self, step, name, factors, updated):
        return step % self.inv_interval == 0 or step < self.num_forced_inverses

    def interval(self, name, what):
        return self.inv_interval if what == "inverse" else self.cov_interval

    def _params(self):
        return {"cov_interval": self.cov_interval, "inv_interval": self.inv_interval,
                "num_forced_inverses": self.num_forced_inverses}


class AdaptiveRefresh(RefreshPolicy):
    r"""SP-NGD's adaptive stale statistics (see the module docstring).

    Args:
        alpha: Similarity threshold ``α > 0`` on ``‖X_new − X‖_F / ‖X‖_F``.
        grow: ``'add1'`` or ``'double'``: how a "similar" factor's interval grows.
        shrink: ``'reset'`` (to 1) or ``'halve'``: how a changed factor's interval shrinks.
        max_interval: Largest interval (≥ 1).

    Example:
        >>> p = AdaptiveRefresh(alpha=0.1, grow="double", max_interval=4)
        >>> p.bind(["fc"])
        >>> X = torch.eye(2)
        >>> for k in range(8):
        ...     if p.stats_due(k, "fc")[0]:
        ...         p.observe_update(k, "fc", "A", X, X * 1.01)  # always similar
        >>> [r["step"] for r in p.refresh_log]
        [0, 2, 6]
    """

    def __init__(self, alpha: float = 0.1, grow: str = "add1", shrink: str = "reset",
                 max_interval: int = 100) -> None:
        super().__init__()
        self.alpha = _positive_real("alpha", alpha)
        if grow not in ("add1", "double"):
            raise ValueError(f"grow must be 'add1' or 'double', got {grow!r}")
        if shrink not in ("reset", "halve"):
            raise ValueError(f"shrink must be 'reset' or 'halve', got {shrink!r}")
        self.grow, self.shrink = grow, shrink
        self.max_interval = _positive_int("max_interval", max_interval)
        self.intervals: dict[str, dict[str, int]] = {}
        self.next_step: dict[str, dict[str, int]] = {}
        self.similarity: dict[str, dict[str, float]] = {}

    def bind(self, layers, unitwise=()):
        super().bind(layers, unitwise)
        for name in self.layers:
            self.intervals.setdefault(name, {"A": 1, "G": 1, "F": 1})
            self.next_step.setdefault(name, {"A": 0, "G": 0, "F": 0})

    def stats_due(self, step, name):
        nxt = self.next_step[name]
        if name in self.unitwise:
            return step >= nxt["F"], step >= nxt["F"]
        return step >= nxt["A"], step >= nxt["G"]

    def inverse_due(self, step, name, factors, updated):
        return updated

    def observe_update(self, step, name, factor, old, new):
        iv = self.intervals[name]
        if old is not None:
            ref = _fro(old)
            diff = _fro(new.to(old.dtype) - old)
            rel = diff / ref if ref > 0 else math.inf
            self.similarity.setdefault(name, {})[factor] = rel
            if rel < self.alpha:
                iv[factor] = min(self.max_interval, iv[factor] + 1 if self.grow == "add1"
                                 else 2 * iv[factor])
            else:
                iv[factor] = 1 if self.shrink == "reset" else max(1, iv[factor] // 2)
        self.next_step[name][factor] = step + iv[factor]
        super().observe_update(step, name, factor, old, new)

    def interval(self, name, what):
        if what == "inverse":
            kinds = ("F",) if name in self.unitwise else ("A", "G")
            return min(self.intervals[name][k] for k in kinds)
        return self.intervals[name][what]

    def _extra_state(self):
        return {"intervals": {n: dict(v) for n, v in self.intervals.items()},
                "next_step": {n: dict(v) for n, v in self.next_step.items()}}

    def _load_extra(self, state):
        self.intervals = {n: dict(v) for n, v in state["intervals"].items()}
        self.next_step = {n: dict(v) for n, v in state["next_step"].items()}

    def _params(self):
        return {"alpha": self.alpha, "grow": self.grow, "shrink": self.shrink,
                "max_interval": self.max_interval}


class TraceRefresh(RefreshPolicy):
    r"""THOR's trace rule: refresh a layer's inverse only when ``|tr X − tr X₀| / tr X₀ ≥ ω``
    for ``X = A`` or ``X = G`` (``X₀``: at the layer's last refresh); statistics every step.

    Example:
        >>> p = TraceRefresh(omega=0.5)
        >>> p.bind(["fc"])
        >>> I = torch.eye(2)
        >>> p.inverse_due(0, "fc", (I, I), True)    # never refreshed
        True
        >>> p.observe_refresh(0, "fc", (I, I))
        >>> p.inverse_due(1, "fc", (1.2 * I, I), True)
        False
        >>> p.inverse_due(2, "fc", (2.0 * I, I), True)
        True
    """

    def __init__(self, omega: float = 0.1) -> None:
        super().__init__()
        self.omega = _positive_real("omega", omega)
        self.traces: dict[str, tuple[float, ...]] = {}

    def inverse_due(self, step, name, factors, updated):
        if name not in self.traces or not factors:
            return True
        for now, then in zip((_trace(X) for X in factors), self.traces[name], strict=True):
            if (abs(now - then) / then if then > 0 else math.inf) >= self.omega:
                return True
        return False

    def observe_refresh(self, step, name, factors):
        self.traces[name] = tuple(_trace(X) for X in factors)
        super().observe_refresh(step, name, factors)

    def _extra_state(self):
        return {"traces": {n: list(t) for n, t in self.traces.items()}}

    def _load_extra(self, state):
        self.traces = {n: tuple(t) for n, t in state["traces"].items()}

    def _params(self):
        return {"omega": self.omega}


class FrequencyRefresh(RefreshPolicy):
    """THOR's released schedule: steps ``0, f, 2f, …`` recompute statistics and inverses, the
    ``f − 1`` steps between use the stale inverses.

    Example:
        >>> p = FrequencyRefresh(frequency=3)
        >>> [p.stats_due(k, "fc")[0] for k in range(6)]
        [True, False, False, True, False, False]
    """

    def __init__(self, frequency: int = 10) -> None:
        super().__init__()
        self.frequency = _positive_int("frequency", frequency)

    def stats_due(self, step, name):
        due = step % self.frequency == 0
        return due, due

    def inverse_due(self, step, name, factors, updated):
        return step % self.frequency == 0

    def interval(self, name, what):
        return self.frequency

    def _params(self):
        return {"frequency": self.frequency}
