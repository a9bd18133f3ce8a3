r"""Hessian-free optimization (Martens 2010) on the damped Gauss–Newton matrix.

Each step linearizes the model once (one forward) and runs conjugate gradients
(:func:`curvlab.linalg.cg`) on

.. math:: (G + (\lambda + \eta) I)\,p = -g,\qquad G = J^\top H_L J,\quad g = J^\top\nabla_{\hat y}L
          + \eta w,

every product being one ``jvp`` + one ``vjp`` at the same point (``η`` = ``weight_decay``, an
ℓ2 term :math:`\tfrac\eta2\lVert w\rVert^2`). CG is warm-started from ``decay ×`` the previous
final CG solution (0.95), capped at ``max_cg_iters``; iterates at Martens' geometric schedule
(``⌈1.3^k⌉``) and the last one are kept and **backtracked**: starting from the last, go to the
previous stored iterate while the mini-batch objective keeps decreasing. The reduction ratio
:math:`\rho = (f(w+p) - f(w)) / (q(p) - q(0))` with the damped quadratic model
:math:`q(p) - q(0) = g^\top p + \tfrac12 p^\top (G + (\lambda+\eta) I) p` (read off CG's
quadratic values, no extra product) drives Levenberg–Marquardt damping: ``ρ < 1/4 ⇒
λ·3/2``, ``ρ > 3/4 ⇒ λ·2/3``. A step that does not decrease the objective is rejected
(parameters unchanged). Not implemented from Martens (2010): the relative-progress CG stopping
rule (CG stops at ``max_cg_iters`` or at relative residual ``cg_tol``), preconditioning, and a
separate curvature mini-batch. Re-evaluations replay the forward's RNG (same dropout masks) and
do not update BatchNorm statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import flatten, linearize, loss_rule, select_params, unflatten
from curvlab.func.params import ParamsArg
from curvlab.linalg.cg import cg
from curvlab.optim._common import (
    check_hyper,
    evaluate_output,
    new_counters,
    restore_buffers,
    rng_state,
    snapshot_buffers,
    warn_skip,
)

__all__ = ["HessianFree"]


class _GGNOperator:
    """Duck-typed ``(P, P)`` operator ``M ↦ G M`` (+ ``η M``) for :func:`curvlab.linalg.cg`."""

    symmetric = True

    def __init__(self, lin: Any, rule: Any, out: Tensor, targets: Tensor, shapes: list,
                 counters: dict[str, int], dtype: torch.dtype) -> None:
        self.lin, self.rule, self.out, self.targets = lin, rule, out, targets
        self.shapes = shapes
        self.counters = counters
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        self.shape = (n, n)
        self.dtype = dtype  # parameter space (under autocast the output may be bf16)
        self.device = out.device

    def __matmul__(self, M: Tensor) -> Tensor:
        cols = []
        for k in range(M.shape[1]):
            v = unflatten(M[:, k], self.shapes)
            u = self.lin.jvp(v)
            cols.append(flatten(self.lin.vjp(self.rule.hessian_vp(self.out, self.targets, u))))
            self.counters["jvp"] += 1
            self.counters["backward"] += 1
            self.counters["ggn_products"] += 1
        return torch.stack(cols, dim=1)


class HessianFree:
    """Hessian-free / truncated-Newton optimizer (see the module docstring).

    Args:
        model, loss_fn: As for every curvlab optimizer.
        lambd: Initial damping λ.
        max_cg_iters: CG iterations per step.
        cg_tol: Relative residual tolerance of CG.
        warm_start_decay: Factor on the previous CG solution used as the initial guess.
        weight_decay: ``η`` of the ℓ2 term.
        lambda_thresholds, lambda_factors: ``(1/4, 3/4)`` and ``(3/2, 2/3)``.
        params, engine: Parameter selection and linearization engine.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HessianFree(net, torch.nn.MSELoss(), max_cg_iters=10)
        >>> losses = [opt.step(x, y).item() for _ in range(5)]
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lambd: float = 1.0,
        max_cg_iters: int = 50,
        cg_tol: float = 1e-6,
        warm_start_decay: float = 0.95,
        weight_decay: float = 0.0,
        lambda_thresholds: tuple[float, float] = (0.25, 0.75),
        lambda_factors: tuple[float, float] = (1.5, 2.0 / 3.0),
        params: ParamsArg = None,
        engine: str = "auto",
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.rule = loss_rule(loss_fn)
        self.params = select_params(model, params)
        self.lambd = check_hyper("lambd", lambd, minimum=0.0)
        if isinstance(max_cg_iters, bool) or not isinstance(max_cg_iters, int) \
                or max_cg_iters < 1:
            raise ValueError(f"max_cg_iters must be an int >= 1, got {max_cg_iters!r}")
        self.max_cg_iters = max_cg_iters
        self.cg_tol = check_hyper("cg_tol", cg_tol, minimum=0.0)
        self.warm_start_decay = check_hyper("warm_start_decay", warm_start_decay, minimum=0.0)
        self.weight_decay = check_hyper("weight_decay", weight_decay, minimum=0.0)
        self.lambda_thresholds = tuple(float(t) for t in lambda_thresholds)
        self.lambda_factors = tuple(float(f) for f in lambda_factors)
        self.engine = engine
        self.shapes = [p.shape for p in self.params.values()]
        self.p_prev: Tensor | None = None
        self.counters = new_counters()
        self.last: dict[str, Any] = {}

    def _objective(self, out: Tensor, targets: Tensor, w: Tensor) -> float:
        f = float(self.rule.value(out, targets))
        if self.weight_decay:
            f += 0.5 * self.weight_decay * float(w @ w)
        return f

    def _set(self, w: Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.params.values(), unflatten(w, self.shapes), strict=True):
                p.copy_(v)

    def step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One HF iteration; returns the mini-batch loss before the update."""
        params = list(self.params.values())
        buffers = snapshot_buffers(self.model)
        rng = rng_state([*params, *[t for t in (inputs, targets) if isinstance(t, Tensor)]])
        lin = linearize(self.model, self.params, inputs, update_buffers=True, engine=self.engine)
        self.counters["forward"] += 1
        out = lin.output.detach()
        self.rule.check(out, targets)
        loss = self.rule.value(out, targets).detach()
        w0 = flatten([p.detach() for p in params]).clone()
        g = flatten(lin.vjp(self.rule.grad(out, targets)))
        self.counters["backward"] += 1
        if self.weight_decay:
            g = g + self.weight_decay * w0
        if not (math.isfinite(float(loss)) and bool(torch.isfinite(g).all())):
            restore_buffers(self.model, buffers)
            self.counters["skipped_steps"] += 1
            warn_skip("HessianFree", "loss or gradient", self.counters["skipped_steps"])
            return loss
        op = _GGNOperator(lin, self.rule, out, targets, self.shapes, self.counters,
                          params[0].dtype)
        x0 = None if self.p_prev is None else self.warm_start_decay * self.p_prev
        keep = {math.ceil(1.3**k) for k in range(60)}
        stored: dict[int, Tensor] = {}

        def callback(i: int, x: Tensor, rnorm: float) -> None:
            if i in keep:
                stored[i] = x.clone()

        damping = self.lambd + self.weight_decay
        res = cg(op, -g, damping=damping, x0=x0, tol=self.cg_tol, max_iter=self.max_cg_iters,
                 callback=callback)
        stored[res.num_iter] = res.x.clone()
        if res.num_iter == 0 and x0 is not None:
            stored[0] = x0.clone()
        f0 = self._objective(out, targets, w0)

        def f_at(p: Tensor) -> float:
            self._set(w0 + p)
            self.counters["forward"] += 1
            return self._objective(evaluate_output(self.model, self.params, inputs, rng,
                                                   self.engine), targets, w0 + p)

        order = sorted(stored, reverse=True)
        best_i, best_f = order[0], f_at(stored[order[0]])
        for i in order[1:]:
            fi = f_at(stored[i])
            if not fi < best_f:
                break
            best_i, best_f = i, fi
        p = stored[best_i]
        q = res.quadratic_values[best_i] if best_i < len(res.quadratic_values) else float("nan")
        ratio = (best_f - f0) / q if q < 0 else -math.inf
        low, high = self.lambda_thresholds
        up, down = self.lambda_factors
        if not math.isfinite(best_f) or not ratio > low:
            self.lambd *= up
        elif ratio > high:
            self.lambd *= down
        accepted = math.isfinite(best_f) and best_f < f0
        self._set(w0 + p if accepted else w0)
        if bool(torch.isfinite(res.x).all()):
            self.p_prev = res.x.clone()
        self.last = {"cg_iters": res.num_iter, "backtracked_to": best_i, "ratio": ratio,
                     "lambd": self.lambd, "accepted": accepted}
        self.counters["steps"] += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``λ``, previous CG solution, counters."""
        return {"lambd": self.lambd,
                "p_prev": None if self.p_prev is None else self.p_prev.clone(),
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.lambd = float(state["lambd"])
        self.p_prev = None if state["p_prev"] is None else state["p_prev"].clone()
        self.counters = dict(state["counters"])
