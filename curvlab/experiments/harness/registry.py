"""Registry of reproducible experiments: ``@register`` an ``fn(ctx) -> Outcome``.

An experiment is a function of a :class:`Context` (where to write, quick or full size, device,
number of seeds, progress bars) that returns an :class:`Outcome`: a result table, the paper's
claims checked against our numbers (:class:`Claim`), the figures it saved, and notes. Both
``python -m curvlab reproduce`` and the notebooks call the same registered function.

Conventions for experiment authors:

* write files under ``ctx.experiment_dir(name)`` (``= ctx.out_dir / name``); sweeps go through
  :func:`curvlab.experiments.harness.runner.run_all` with ``out_dir=ctx.out_dir`` (resumable);
* quick mode (``ctx.full is False``) must run in well under 2 minutes on 2 CPU cores;
* a claim that does not hold is a finding, not an error: return it with ``holds=False``.

Example:
    >>> import pandas as pd
    >>> @register("doc-demo", title="Demo", paper="nobody 2024")
    ... def demo(ctx: Context) -> Outcome:
    ...     return Outcome(pd.DataFrame({"x": [1]}), [Claim("x is one", True, "x=1")], [])
    >>> get_experiment("doc-demo").title
    'Demo'
    >>> unregister("doc-demo")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from curvlab.experiments.harness.provenance import resolve_device

__all__ = [
    "Claim",
    "Context",
    "Experiment",
    "Outcome",
    "get_experiment",
    "list_experiments",
    "make_context",
    "register",
    "unregister",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


@dataclass
class Context:
    """Settings an experiment runs under.

    Attributes:
        out_dir: Root results directory (an experiment writes under ``out_dir / <name>``).
        full: Full-size (paper-scale, GPU) run instead of the quick CPU run.
        device: Device for models and data.
        seeds: Number of seeds requested on the command line; ``None`` = experiment's default.
        progress: Show progress bars.

    Example:
        >>> ctx = Context(Path("results"), False, torch.device("cpu"), None, False)
        >>> ctx.seed_list(default=3), ctx.seed_list(default=3, full_default=5)
        ([0, 1, 2], [0, 1, 2])
    """

    out_dir: Path
    full: bool
    device: torch.device
    seeds: int | None
    progress: bool

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.device = torch.device(self.device)
        if self.seeds is not None and (isinstance(self.seeds, bool) or self.seeds < 1):
            raise ValueError(f"Context: seeds must be a positive int or None, got {self.seeds!r}")

    def seed_list(self, default: int = 1, full_default: int | None = None) -> list[int]:
        """Seeds ``0..n-1``: ``n = seeds`` if given, else ``default`` (``full_default`` if full)."""
        if self.seeds is not None:
            n = self.seeds
        else:
            n = full_default if (self.full and full_default is not None) else default
        return list(range(n))

    def experiment_dir(self, name: str) -> Path:
        """``out_dir / name``, created if missing."""
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_context(
    out_dir: str | Path = "results",
    *,
    full: bool = False,
    device: str | torch.device = "auto",
    seeds: int | None = None,
    progress: bool = False,
) -> Context:
    """Build a :class:`Context`; ``device="auto"`` picks CUDA when available (for notebooks).

    Example:
        >>> make_context("results", device="cpu").device
        device(type='cpu')
    """
    return Context(Path(out_dir), full, resolve_device(device), seeds, progress)


@dataclass
class Claim:
    """A statement from a paper (or our own expectation) and whether our run supports it.

    Example:
        >>> Claim("K-FAC beats SGD", holds=False, detail="K-FAC 120 s vs SGD 80 s").holds
        False
    """

    name: str
    holds: bool
    detail: str

    def __post_init__(self) -> None:
        self.holds = bool(self.holds)


@dataclass
class Outcome:
    """What an experiment returns.

    Attributes:
        table: Main result table (written to ``<name>/table.csv`` by the reproduce command).
        claims: Checked claims.
        figures: PNG files the experiment saved.
        notes: Free text (e.g. optimizers not run and why).
        key_numbers: Optional headline numbers for the summary table, ``{label: value}``.

    Example:
        >>> Outcome(pd.DataFrame(), [], []).notes
        ''
    """

    table: pd.DataFrame
    claims: list[Claim]
    figures: list[Path]
    notes: str = ""
    key_numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see :func:`register`)."""

    name: str
    title: str
    paper: str
    fn: Callable[[Context], Outcome]
    module: str

    def __call__(self, ctx: Context) -> Outcome:
        outcome = self.fn(ctx)
        if not isinstance(outcome, Outcome):
            raise TypeError(
                f"experiment {self.name!r} ({self.module}) returned {type(outcome).__name__}, "
                "expected an Outcome"
            )
        return outcome


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, *, title: str, paper: str) -> Callable:
    """Decorator registering ``fn(ctx: Context) -> Outcome`` under ``name``.

    ``name`` is lower-case letters, digits, ``-`` and ``_`` (it names the results directory).
    Registering a second, different function under a taken name raises ``ValueError``; the same
    function re-registered (module reload in a notebook) replaces the entry. The decorated
    function is returned unchanged.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"register: name {name!r} must match {_NAME.pattern} (lower-case, digits, '-', '_')"
        )
    for label, value in (("title", title), ("paper", paper)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"register({name!r}): {label} must be a non-empty str")

    def decorator(fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        if not callable(fn):
            raise TypeError(f"register({name!r}): expected a function, got {type(fn).__name__}")
        module = getattr(fn, "__module__", "?")
        old = _REGISTRY.get(name)
        if old is not None and (old.module, old.fn.__qualname__) != (module, fn.__qualname__):
            raise ValueError(
                f"register: experiment name {name!r} is already taken by "
                f"{old.module}.{old.fn.__qualname__}"
            )
        _REGISTRY[name] = Experiment(name, title, paper, fn, module)
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests); ``KeyError`` if absent."""
    if name not in _REGISTRY:
        raise KeyError(f"unregister: no experiment named {name!r}")
    del _REGISTRY[name]


def list_experiments() -> list[Experiment]:
    """Registered experiments in registration order."""
    return list(_REGISTRY.values())


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"unknown experiment {name!r}; known experiments: {known}") from None
