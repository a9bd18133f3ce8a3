"""The one optimizer factory of the experiments, and tuned/untuned method definitions.

:func:`build_optimizer` turns an optimizer name and a flat, JSON-friendly keyword dict (what a
run config stores) into a ``curvlab.optim`` optimizer; every study builds its optimizers here,
so renaming an optimizer class or argument is a one-place change (:data:`_CLASSES`).

A :class:`Method` is what a results table calls one row: a label (``"K-FAC (tridiag, adaptive)"``),
an optimizer name understood by :func:`build_optimizer` (:data:`OPTIMIZER_NAMES`), fixed keyword
arguments and a hyperparameter grid (empty = used untuned). Optimizers that do not exist (yet) or
reject a setting are reported by :func:`unavailable_reason` instead of being dropped.

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

from curvlab.experiments.harness.muon import MuonAdamW

__all__ = ["OPTIMIZER_NAMES", "Method", "build_optimizer", "unavailable_reason"]

#: optimizer name -> (attribute of ``curvlab.optim``, ``torch.optim`` class for TorchOptimizer)
_CLASSES: dict[str, tuple[str, type[torch.optim.Optimizer] | None]] = {
    "sgd": ("TorchOptimizer", torch.optim.SGD),
    "adam": ("TorchOptimizer", torch.optim.Adam),
    "muon": ("TorchOptimizer", MuonAdamW),
    "curveball": ("CurveBall", None),
    "hessian-free": ("HessianFree", None),
    "kfac": ("KFACOptimizer", None),
    "ngd": ("NaturalGradient", None),
    "lm": ("DenseLevenbergMarquardt", None),
    "bfgs": ("DenseBFGS", None),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_CLASSES)
#: old keyword -> new keyword of the curvlab optimizers: recorded run configs keep the old key
#: (so their run keys stay the same); :func:`build_optimizer` passes the new one, so no run
#: emits the optimizers' ``DeprecationWarning``. The one place that translates them. (The old
#: ``curvature=`` is not here: its values were renamed too, ``'ggn'`` -> ``'type2'``, and no
#: study uses it.)
_RENAMED_KWARGS: dict[str, str] = {"lambd": "damping"}


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


def build_optimizer(name: str, model: nn.Module, loss_fn: Callable, hp: Mapping[str, Any], *,
                    seed: int | None = None) -> Any:
    """Construct optimizer ``name`` (see :data:`OPTIMIZER_NAMES`) with keyword arguments ``hp``.

    ``"sgd"``/``"adam"`` wrap ``torch.optim.SGD``/``Adam`` through
    ``curvlab.optim.TorchOptimizer``; for ``"adam"`` the flat keys ``beta1``/``beta2`` (CSV
    friendly) stand for ``betas=(beta1, beta2)`` (defaults 0.9, 0.999). ``"muon"`` wraps
    :class:`~curvlab.experiments.harness.muon.MuonAdamW` (``torch.optim.Muon`` on the weight
    matrices, convolution filters flattened, AdamW on the rest: ``lr``, ``adamw_lr``,
    ``momentum``, ``weight_decay``). The old keyword ``lambd`` of the curvlab optimizers
    (:data:`_RENAMED_KWARGS`) is passed as ``damping``. The other names are
    ``curvlab.optim`` classes: ``"curveball"`` CurveBall, ``"hessian-free"`` HessianFree,
    ``"kfac"`` K-FAC, ``"ngd"`` NaturalGradient, ``"lm"``/``"bfgs"`` the dense
    Levenberg-Marquardt / BFGS baselines. ``seed`` gives the optimizer its own sampling stream,
    ``generator=torch.Generator(<model's device>).manual_seed(seed)``; without it the
    optimizer draws from torch's global generator.

    Raises ``ValueError`` for an unknown name or conflicting keys and ``ImportError`` when the
    class does not exist.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = build_optimizer("adam", net, torch.nn.MSELoss(),
        ...                       {"lr": 0.1, "beta1": 0.5, "beta2": 0.9})
        >>> opt.optimizer.defaults["betas"]
        (0.5, 0.9)
    """
    if name not in _CLASSES:
        raise ValueError(f"build_optimizer: unknown optimizer {name!r}; known: {OPTIMIZER_NAMES}")
    attr, torch_cls = _CLASSES[name]
    kwargs = dict(hp)
    if torch_cls is None:
        for old, new in _RENAMED_KWARGS.items():
            if old in kwargs:
                if new in kwargs:
                    raise ValueError(f"build_optimizer({name!r}): give {new}= or its old name "
                                     f"{old}=, not both")
                kwargs[new] = kwargs.pop(old)
    if name == "adam" and ({"beta1", "beta2"} & set(kwargs)):
        if "betas" in kwargs:
            raise ValueError("build_optimizer('adam'): give betas= or beta1=/beta2=, not both")
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    if seed is not None:
        if "generator" in kwargs:
            raise ValueError(f"build_optimizer({name!r}): give seed= or generator=, not both")
        device = next(model.parameters()).device
        kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seed))
    cls = _optimizer_class(attr)
    if torch_cls is not None:
        return cls(model, loss_fn, torch_cls, **kwargs)
    return cls(model, loss_fn, **kwargs)


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
