"""Methods ``time_to_target.py`` tunes itself (not in ``curvlab.experiments``' sweeps).

Each :class:`Extra` has a label, a grid and ``make(hp) -> opt_factory(model, loss_fn)``; the
optimizer's ``step(x, y)`` returns the mini-batch loss (what ``curvlab.experiments.train``
needs). What users would pick instead of K-FAC: ``torch.optim.Muon`` (2-D weights; AdamW
for biases and convolution kernels), heavyball's SOAP and PSGD-Kron (if installed); and the
K-FAC variants: adaptive, preconditioner + SGD with and without ``kl_clip``, and the options
``inverse='cholesky'``, ``split_dim``, ``refresh=AdaptiveRefresh()``, ``stats_fraction``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlab.experiments.harness.muon import MuonAdamW
from curvlab.kfac import AdaptiveRefresh
from curvlab.optim import KFACOptimizer
from curvlab.optim.preconditioner import KFACPreconditioner


class Stepper:
    """``step(x, y)``: zero grads, forward, backward, [K-FAC preconditioner], optimizers."""

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizers: Sequence[Any],
                 preconditioner: KFACPreconditioner | None = None) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.optimizers, self.preconditioner = list(optimizers), preconditioner

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        if self.preconditioner is not None and self.preconditioner.fisher == "mc":
            self.preconditioner.sample_backward(out)
        loss.backward()
        if self.preconditioner is not None:
            self.preconditioner.step()
        for opt in self.optimizers:
            opt.step()
        return loss.detach()


@dataclass(frozen=True)
class Extra:
    """A method with its own builder: ``make(hp)(model, loss_fn) -> optimizer``."""

    label: str
    make: Callable[[Mapping[str, Any]], Callable[[nn.Module, Callable], Any]]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    first_order: bool = False

    def points(self, quick: bool = False) -> list[dict[str, Any]]:
        pts: list[dict[str, Any]] = [{}]
        for k, vs in self.grid.items():
            pts = [{**p, k: v} for p in pts for v in (vs[:1] if quick else vs)]
        return pts


def _muon(hp):
    def factory(model, loss_fn):
        mats = [p for p in model.parameters() if p.ndim == 2]  # filters stay on AdamW
        return Stepper(model, loss_fn, [MuonAdamW(model.parameters(), lr=hp["lr"],
                                                  muon_params=mats, adamw_lr=hp["adamw_lr"])])
    return factory


def _heavyball(name):
    def make(hp):
        def factory(model, loss_fn):
            import heavyball

            return Stepper(model, loss_fn, [getattr(heavyball, name)(model.parameters(),
                                                                      lr=hp["lr"])])
        return factory
    return make


def _kfac_opt(adaptive_refresh: bool = False, **fixed):
    def make(hp):
        def factory(model, loss_fn):  # a fresh (stateful) refresh policy per run
            extra = {"refresh": AdaptiveRefresh()} if adaptive_refresh else {}
            return KFACOptimizer(model, loss_fn, **fixed, **extra, **hp)
        return factory
    return make


def _kfac_sgd(**fixed):
    def make(hp):
        def factory(model, loss_fn):
            sgd = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=0.9)
            kl = fixed.get("kl_clip")
            pre = KFACPreconditioner(model, loss_fn, damping=hp["damping"], fisher="mc",
                                     inv_interval=20, kl_clip=kl,
                                     lr=hp["lr"] if kl is not None else None)
            return Stepper(model, loss_fn, [sgd], pre)
        return factory
    return make


def extra_methods(heavyball: bool = False) -> list[Extra]:
    """The extra methods; heavyball's SOAP / PSGD-Kron only with ``heavyball=True`` and when it
    is installed (it is compile-first: on a CPU its ``torch.compile`` autotuning takes many
    minutes per run)."""
    damping = [1e-3, 1e-2, 1e-1]
    out = [
        Extra("Muon + AdamW", _muon, {"lr": [0.01, 0.02, 0.05], "adamw_lr": [1e-3, 3e-3]},
              first_order=True),
    ]
    if heavyball and importlib.util.find_spec("heavyball") is not None:
        out += [Extra("SOAP (heavyball)", _heavyball("SOAP"), {"lr": [1e-3, 3e-3, 1e-2]},
                      first_order=True),
                Extra("PSGD-Kron (heavyball)", _heavyball("PSGDKron"),
                      {"lr": [1e-3, 3e-3, 1e-2]}, first_order=True)]
    out += [
        Extra("K-FAC adaptive", _kfac_opt(adaptive=True), {"damping": damping}),
        Extra("K-FAC precond + SGD", _kfac_sgd(), {"lr": [0.01, 0.03, 0.1], "damping": damping}),
        Extra("K-FAC precond + SGD (kl_clip=1e-3)", _kfac_sgd(kl_clip=1e-3),
              {"lr": [0.03, 0.1, 0.3], "damping": damping}),
        Extra("K-FAC cholesky", _kfac_opt(inverse="cholesky"),
              {"lr": [0.1, 0.3, 1.0], "damping": damping}),
        Extra("K-FAC split_dim=128", _kfac_opt(split_dim=128),
              {"lr": [0.1, 0.3, 1.0], "damping": damping}),
        Extra("K-FAC AdaptiveRefresh", _kfac_opt(adaptive_refresh=True),
              {"lr": [0.1, 0.3, 1.0], "damping": damping}),
        Extra("K-FAC stats_fraction=1/8", _kfac_opt(stats_fraction=0.125),
              {"lr": [0.1, 0.3, 1.0], "damping": damping}),
    ]
    return out
