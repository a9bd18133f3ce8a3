"""Optimizers by name for the comparison experiments, and tuned/untuned method definitions.

A :class:`Method` is what a results table calls one row: a label (``"K-FAC (tridiag, adaptive)"``),
an optimizer name understood by :func:`build_optimizer` (``"sgd"``, ``"adam"``, ``"curveball"``,
``"hessian-free"``, ``"kfac"``), fixed keyword arguments and a hyperparameter grid (empty = used
untuned). Optimizers that do not exist (yet) or reject a setting are reported by
:func:`unavailable_reason` instead of being dropped.

Example:
    >>> import torch
    >>> m = Method("SGD", "sgd", {"momentum": 0.9}, {"lr": [0.1, 1.0]})
    >>> m.configs()
    [{'momentum': 0.9, 'lr': 0.1}, {'momentum': 0.9, 'lr': 1.0}]
    >>> opt = build_optimizer("sgd", torch.nn.Linear(2, 1), torch.nn.MSELoss(), m.configs()[0])
    >>> type(opt).__name__
    'TorchOptimizer'
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZER_NAMES", "Method", "build_optimizer", "unavailable_reason"]

#: optimizer name -> (attribute of ``curvlab.optim``, fixed keyword arguments)
_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("TorchOptimizer", {"optimizer_cls": torch.optim.SGD}),
    "adam": ("TorchOptimizer", {"optimizer_cls": torch.optim.Adam}),
    "curveball": ("CurveBall", {}),
    "hessian-free": ("HessianFree", {}),
    "kfac": ("KFAC", {}),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_CLASSES)


@dataclass(frozen=True)
class Method:
    """One compared method: ``label``, optimizer name, fixed kwargs and a tuning grid.

    Attributes:
        label: Name shown in tables and figures.
        optimizer: One of :data:`OPTIMIZER_NAMES`.
        fixed: Keyword arguments used for every configuration.
        grid: ``{hyperparameter: values}``; the configurations are the Cartesian product.
        first_order: Whether the method is a first-order baseline (SGD, Adam).
    """

    label: str
    optimizer: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    first_order: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in _CLASSES:
            raise ValueError(
                f"Method {self.label!r}: optimizer must be one of {OPTIMIZER_NAMES}, got "
                f"{self.optimizer!r}"
            )

    @property
    def tuned(self) -> bool:
        """Whether a grid with more than one configuration is searched."""
        return len(self.configs()) > 1

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points (``[{}]`` for an untuned method)."""
        names = list(self.grid)
        return [dict(zip(names, values))
                for values in itertools.product(*(self.grid[n] for n in names))]

    def configs(self) -> list[dict[str, Any]]:
        """All keyword-argument dicts (fixed merged with each grid point)."""
        return [{**self.fixed, **point} for point in self.grid_points()]


def build_optimizer(name: str, model: nn.Module, loss_fn: Callable, hp: Mapping[str, Any]) -> Any:
    """Construct optimizer ``name`` (see :data:`OPTIMIZER_NAMES`) with keyword arguments ``hp``.

    ``"sgd"``/``"adam"`` wrap ``torch.optim`` through ``curvlab.optim.TorchOptimizer``.
    Classes are taken from ``curvlab.optim``.
    Raises ``ValueError`` for an unknown name and ``ImportError`` when the class does not exist.
    """
    if name not in _CLASSES:
        raise ValueError(f"build_optimizer: unknown optimizer {name!r}; known: {OPTIMIZER_NAMES}")
    attr, fixed = _CLASSES[name]
    cls = _optimizer_class(attr)
    if attr == "TorchOptimizer":
        return cls(model, loss_fn, fixed["optimizer_cls"], **dict(hp))
    return cls(model, loss_fn, **{**fixed, **dict(hp)})


def _optimizer_class(attr: str) -> type:
    import curvlab.optim as optim

    cls = getattr(optim, attr, None)
    if cls is None:
        raise ImportError(f"curvlab.optim has no {attr}")
    return cls


def unavailable_reason(method: Method, model_factory: Callable[[], nn.Module],
                       loss_fn: Callable) -> str | None:
    """``None`` when every configuration of ``method`` can be constructed on
    ``model_factory()``, else a short reason (e.g. ``"ImportError: ..."``).
    """
    for hp in method.configs():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # construction warnings reappear in train()
                build_optimizer(method.optimizer, model_factory(), loss_fn, hp)
        except (ImportError, NotImplementedError, TypeError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
    return None
