r"""Dense Levenberg–Marquardt and BFGS for tiny problems (a handful of parameters).

They play the roles of MATLAB's ``lsqnonlin('levenberg-marquardt')`` and
``fminunc('quasi-newton', 'bfgs')`` in the CurveBall toy experiments, behind the curvlab step
interface. Both work on the flat parameter vector (flat order of :mod:`curvlab.func.params`)
with explicit float64 matrices; every function evaluation within a step uses the step's
mini-batch (the MATLAB runs redrew the Rosenbrock noise at every evaluation; see
``papers/curveball.md``). Model buffers are never modified (functional evaluation with cloned
buffers; BatchNorm in train mode uses batch statistics).

* :class:`DenseLevenbergMarquardt`: :math:`(G + \lambda I)p = -g` with the dense GGN
  :math:`G = J^\top H_L J` (for a least-squares loss the Gauss–Newton matrix
  :math:`2J_r^\top J_r`); accept if the loss decreases (``λ ← λ/10``), else ``λ ← 10λ`` and
  retry, up to ``max_tries`` times per step (one step = one LM iteration).
* :class:`DenseBFGS`: inverse-Hessian BFGS with a backtracking Armijo line search from
  ``α = 1``; the first update rescales the initial identity by ``sᵀy/yᵀy``; updates with
  ``sᵀy <= 1e-12`` are skipped (curvature condition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import flatten, loss_rule, unflatten
from curvlab.func.params import ParamsArg, cloned_buffers
from curvlab.optim._common import check_hyper
from curvlab.optim._compat import deprecated_alias, renamed_kwargs
from curvlab.optim.base import CurvatureOptimizer, SkipStep

__all__ = ["DenseBFGS", "DenseLevenbergMarquardt"]


class _DenseBase(CurvatureOptimizer):
    name = "dense"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 params: ParamsArg, max_params: int, defaults: dict[str, Any]) -> None:
        super().__init__(model, loss_fn, params, defaults)
        self._names = list(self.params)
        self._shapes = [p.shape for p in self.params.values()]
        n = sum(p.numel() for p in self.params.values())
        if n > max_params:
            raise ValueError(
                f"{type(self).__name__} builds dense {n}x{n} matrices; the model has {n} "
                f"selected parameters, more than max_params={max_params}"
            )
        self.num_params = n

    def _w(self) -> Tensor:
        return flatten([p.detach() for p in self.params.values()]).to(torch.float64)

    def _set_w(self, w: Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.params.values(), unflatten(w, self._shapes), strict=True):
                p.copy_(v.to(p.dtype))

    def _output(self, w: Tensor, inputs: Any) -> Tensor:
        dtype = next(iter(self.params.values())).dtype
        ps = dict(zip(self._names, unflatten(w.to(dtype), self._shapes), strict=True))
        return torch.func.functional_call(self.model, (ps, cloned_buffers(self.model)),
                                          (inputs,))

    def _loss(self, w: Tensor, inputs: Any, targets: Tensor) -> Tensor:
        self.counters["forward"] += 1
        return self.loss_fn(self._output(w, inputs), targets).to(torch.float64)



class DenseLevenbergMarquardt(_DenseBase):
    r"""Levenberg–Marquardt on the dense Gauss–Newton matrix (tiny problems only).

    Args:
        model, loss_fn: As for every curvlab optimizer.
        damping: Initial damping λ (0.01 as MATLAB's ``lsqnonlin``; old keyword ``lambd``
            deprecated); adapted in ``param_groups[...]["damping"]``.
        factor: Damping factor on failure/success (10).
        max_tries: Damping increases per step before giving up (parameters unchanged).
        max_params: Refuse models with more parameters.

    Example:
        >>> from curvlab.problems.rosenbrock import StochasticRosenbrock
        >>> prob = StochasticRosenbrock(None, x0_noise=0.0)
        >>> opt = DenseLevenbergMarquardt(prob.make_model(), prob.loss_fn)
        >>> batch = prob.draw_batch(None)
        >>> losses = [float(opt.step(*batch)) for _ in range(30)]
        >>> losses[-1] < 1e-10
        True
    """

    name = "DenseLevenbergMarquardt"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 damping: float | None = None, factor: float = 10.0, max_tries: int = 30,
                 params: ParamsArg = None, max_params: int = 2000, **deprecated: Any) -> None:
        damping = renamed_kwargs(self.name, deprecated, {"lambd": "damping"},
                                 {"damping": damping}).get("damping", damping)
        damping = check_hyper("damping", 0.01 if damping is None else damping, minimum=0.0,
                              strict=True)
        super().__init__(model, loss_fn, params, max_params, {"damping": damping})
        self.rule = loss_rule(loss_fn)
        self.factor = check_hyper("factor", factor, minimum=1.0, strict=True)
        if not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}")
        self.max_tries = max_tries

    global_hypers = ("damping",)

    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One LM iteration; returns the loss before the update."""
        w = self._w()
        out = self._output(w, inputs).detach()
        self.counters["forward"] += 1
        self.rule.check(out, targets)
        loss = self.rule.value(out, targets).detach()
        J = torch.func.jacfwd(lambda v: self._output(v, inputs))(w)  # (*out.shape, P)
        self.counters["jvp"] += self.num_params
        cols = J.movedim(-1, 0)  # (P, *out.shape): J e_k per parameter
        HJ = torch.func.vmap(lambda c: self.rule.hessian_vp(out, targets, c))(cols)
        J2 = cols.reshape(self.num_params, -1).to(torch.float64)
        G = J2 @ HJ.reshape(self.num_params, -1).to(torch.float64).T
        G = 0.5 * (G + G.T)
        g = J2 @ self.rule.grad(out, targets).reshape(-1).to(torch.float64)
        self.counters["backward"] += 1
        if not (torch.isfinite(loss) and torch.isfinite(G).all() and torch.isfinite(g).all()):
            raise SkipStep("loss or Jacobian", loss)
        eye = torch.eye(self.num_params, dtype=torch.float64, device=w.device)
        f0 = float(loss)
        lam = self.hyper("damping")
        for _ in range(self.max_tries):
            p = torch.linalg.solve(G + lam * eye, -g)
            f1 = float(self._loss(w + p, inputs, targets))
            if f1 < f0:
                self._set_w(w + p)
                lam = max(lam / self.factor, 1e-15)
                break
            lam *= self.factor
        self.set_hyper("damping", lam)
        self.diagnostics = {"damping": lam}
        return loss

    lambd = deprecated_alias("lambd", 'hyper("damping")', lambda self: self.hyper("damping"),
                             lambda self, v: self.set_hyper("damping", float(v)))


class DenseBFGS(_DenseBase):
    """BFGS with a dense inverse-Hessian approximation and Armijo backtracking (tiny problems).

    Args:
        model, loss_fn: As for every curvlab optimizer.
        c1: Armijo constant; ``shrink``: step shrink factor; ``max_backtracks``: per step.
        max_params: Refuse models with more parameters.

    Example:
        >>> from curvlab.problems.rosenbrock import StochasticRosenbrock
        >>> prob = StochasticRosenbrock(None, x0_noise=0.0)
        >>> opt = DenseBFGS(prob.make_model(), prob.loss_fn)
        >>> batch = prob.draw_batch(None)
        >>> losses = [float(opt.step(*batch)) for _ in range(60)]
        >>> losses[-1] < 1e-8
        True
    """

    name = "DenseBFGS"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40,
                 params: ParamsArg = None, max_params: int = 2000) -> None:
        super().__init__(model, loss_fn, params, max_params, {})
        self.c1 = check_hyper("c1", c1, minimum=0.0)
        self.shrink = check_hyper("shrink", shrink, minimum=0.0, strict=True)
        self.max_backtracks = max_backtracks
        self.H: Tensor | None = None
        self._scaled = False

    def _value_and_grad(self, w: Tensor, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(w, inputs, targets)
            (g,) = torch.autograd.grad(loss, w)
        self.counters["backward"] += 1
        return loss.detach(), g

    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One BFGS iteration (line search on the same mini-batch); returns the prior loss."""
        w = self._w()
        f0, g0 = self._value_and_grad(w, inputs, targets)
        if not (torch.isfinite(f0) and torch.isfinite(g0).all()):
            raise SkipStep("loss or gradient", f0)
        if self.H is None:
            self.H = torch.eye(self.num_params, dtype=torch.float64, device=w.device)
        d = -(self.H @ g0)
        slope = float(g0 @ d)
        if slope >= 0:  # not a descent direction: reset to steepest descent
            self.H = torch.eye(self.num_params, dtype=torch.float64, device=w.device)
            self._scaled = False
            d, slope = -g0, -float(g0 @ g0)
        alpha, accepted = 1.0, False
        for _ in range(self.max_backtracks):
            f1 = float(self._loss(w + alpha * d, inputs, targets))
            if f1 <= float(f0) + self.c1 * alpha * slope:
                accepted = True
                break
            alpha *= self.shrink
        if accepted:
            s = alpha * d
            _, g1 = self._value_and_grad(w + s, inputs, targets)
            y = g1 - g0
            sy = float(s @ y)
            if sy > 1e-12 and torch.isfinite(y).all():
                if not self._scaled:
                    self.H = self.H * (sy / float(y @ y))
                    self._scaled = True
                rho = 1.0 / sy
                eye = torch.eye(self.num_params, dtype=torch.float64, device=w.device)
                V = eye - rho * torch.outer(s, y)
                self.H = V @ self.H @ V.T + rho * torch.outer(s, s)
            self._set_w(w + s)
        return f0.to(next(iter(self.params.values())).dtype)

    def _extra_state(self) -> dict[str, Any]:
        """The dense inverse-Hessian approximation ``H`` (flat order) and its scaling flag."""
        return {"H": self.H, "scaled": self._scaled}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.H = state["H"]
        self._scaled = bool(state["scaled"])
