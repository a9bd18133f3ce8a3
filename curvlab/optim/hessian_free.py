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

The GGN products come from one :class:`curvlab.operators.LocalGGN` per step (the operator
handed to CG). λ is ``param_groups[...]["damping"]`` (adapted in place); ``lr`` (default 1)
scales the accepted step ``w ← w + lr·p`` (backtracking and the ratio use the full ``p``), so
a ``torch.optim.lr_scheduler`` can drive it. The previous CG solution (warm start) is
``state[p]["cg_solution"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import flatten, loss_rule, unflatten
from curvlab.func.params import ParamsArg
from curvlab.linalg.cg import cg
from curvlab.operators.local import LocalGGN
from curvlab.optim._common import check_hyper, evaluate_output, rng_state
from curvlab.optim._compat import deprecated_alias, renamed_kwargs
from curvlab.optim.base import CurvatureOptimizer, SkipStep

__all__ = ["HessianFree"]


class HessianFree(CurvatureOptimizer):
    """Hessian-free / truncated-Newton optimizer (see the module docstring).

    Args:
        model, loss_fn: As for every curvlab optimizer.
        damping: Initial damping λ (old keyword ``lambd``: deprecated, still accepted).
        lr: Multiplier of the accepted step (1.0: Martens' HF).
        max_cg_iters: CG iterations per step.
        cg_tol: Relative residual tolerance of CG.
        warm_start_decay: Factor on the previous CG solution used as the initial guess.
        weight_decay: ``η`` of the ℓ2 term.
        lambda_thresholds, lambda_factors: ``(1/4, 3/4)`` and ``(3/2, 2/3)``.
        params, engine: Parameter selection and linearization engine.

    ``diagnostics``: ``cg_iters``, ``backtracked_to``, ``ratio``, ``damping``, ``accepted``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = HessianFree(net, torch.nn.MSELoss(), max_cg_iters=10)
        >>> losses = [opt.step(x, y).item() for _ in range(5)]
        >>> losses[-1] < losses[0]
        True
    """

    global_hypers = ("lr", "damping", "weight_decay")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        damping: float | None = None,
        lr: float = 1.0,
        max_cg_iters: int = 50,
        cg_tol: float = 1e-6,
        warm_start_decay: float = 0.95,
        weight_decay: float = 0.0,
        lambda_thresholds: tuple[float, float] = (0.25, 0.75),
        lambda_factors: tuple[float, float] = (1.5, 2.0 / 3.0),
        params: ParamsArg = None,
        engine: str = "auto",
        **deprecated: Any,
    ) -> None:
        damping = renamed_kwargs("HessianFree", deprecated, {"lambd": "damping"},
                                 {"damping": damping}).get("damping", damping)
        defaults = {
            "lr": check_hyper("lr", lr, minimum=0.0, strict=True),
            "damping": check_hyper("damping", 1.0 if damping is None else damping, minimum=0.0),
            "weight_decay": check_hyper("weight_decay", weight_decay, minimum=0.0),
        }
        super().__init__(model, loss_fn, params, defaults)
        self.rule = loss_rule(loss_fn)
        if isinstance(max_cg_iters, bool) or not isinstance(max_cg_iters, int) \
                or max_cg_iters < 1:
            raise ValueError(f"max_cg_iters must be an int >= 1, got {max_cg_iters!r}")
        self.max_cg_iters = max_cg_iters
        self.cg_tol = check_hyper("cg_tol", cg_tol, minimum=0.0)
        self.warm_start_decay = check_hyper("warm_start_decay", warm_start_decay, minimum=0.0)
        self.lambda_thresholds = tuple(float(t) for t in lambda_thresholds)
        self.lambda_factors = tuple(float(f) for f in lambda_factors)
        self.engine = engine
        self.shapes = [p.shape for p in self.params.values()]

    @property
    def p_prev(self) -> Tensor | None:
        """The previous step's final CG solution, flat (``None`` before the first step)."""
        parts = [self.state[p].get("cg_solution") for p in self.params.values()]
        return None if parts[0] is None else flatten(parts)

    def _objective(self, out: Tensor, targets: Tensor, w: Tensor) -> float:
        f = float(self.rule.value(out, targets))
        wd = self.hyper("weight_decay")
        if wd:
            f += 0.5 * wd * float(w @ w)
        return f

    def _set(self, w: Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.params.values(), unflatten(w, self.shapes), strict=True):
                p.copy_(v)

    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        params = list(self.params.values())
        wd = self.hyper("weight_decay")
        rng = rng_state([*params, *[t for t in (inputs, targets) if isinstance(t, Tensor)]])
        G = LocalGGN(self.model, self.rule, self.params, inputs, targets, update_buffers=True,
                     engine=self.engine)
        out = G.output
        loss = G.loss
        w0 = flatten([p.detach() for p in params]).clone()
        g = flatten(G.gradient())
        if wd:
            g = g + wd * w0
        if not (math.isfinite(float(loss)) and bool(torch.isfinite(g).all())):
            self._add_counts(G)
            raise SkipStep("loss or gradient", loss)
        p_prev = self.p_prev
        x0 = None if p_prev is None else self.warm_start_decay * p_prev
        keep = {math.ceil(1.3**k) for k in range(60)}
        stored: dict[int, Tensor] = {}

        def callback(i: int, x: Tensor, rnorm: float) -> None:
            if i in keep:
                stored[i] = x.clone()

        damping = self.hyper("damping") + wd
        res = cg(G, -g, damping=damping, x0=x0, tol=self.cg_tol, max_iter=self.max_cg_iters,
                 callback=callback)
        self._add_counts(G)
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
        lam = self.hyper("damping")
        if not math.isfinite(best_f) or not ratio > low:
            lam *= up
        elif ratio > high:
            lam *= down
        self.set_hyper("damping", lam)
        accepted = math.isfinite(best_f) and best_f < f0
        lr = self.hyper("lr")
        self._set((w0 + p if lr == 1.0 else w0 + lr * p) if accepted else w0)
        if bool(torch.isfinite(res.x).all()):
            for prm, part in zip(params, unflatten(res.x.clone(), self.shapes), strict=True):
                self.state[prm]["cg_solution"] = part
        self.diagnostics = {"cg_iters": res.num_iter, "backtracked_to": best_i, "ratio": ratio,
                            "damping": lam, "accepted": accepted}
        return loss

    def _add_counts(self, G: LocalGGN) -> None:
        for k, v in G.counts.items():
            self.counters[k] += v

    lambd = deprecated_alias("lambd", 'hyper("damping")', lambda self: self.hyper("damping"),
                             lambda self, v: self.set_hyper("damping", float(v)))
