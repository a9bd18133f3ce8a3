r"""Martens & Grosse's adaptive K-FAC step (§6–7): the (α, μ) quadratic model with exact GGN
products, the Levenberg–Marquardt λ rule and the γ search (:class:`AdaptiveKFACMixin`, used by
:class:`curvlab.optim.KFACOptimizer` with ``adaptive=True``; the math is in its module
docstring)."""

from __future__ import annotations

import math

import torch

from curvlab.func.linearize import linearize
from curvlab.func.params import cloned_buffers
from curvlab.operators.local import LocalGGN
from curvlab.optim._common import dot64, replay_rng

__all__ = ["AdaptiveKFACMixin"]


class AdaptiveKFACMixin:
    """Adaptive steps for :class:`~curvlab.optim.KFACOptimizer` (needs its model, params,
    rule, loss_fn, counters, gamma, momentum buffers and preconditioning)."""

    # ---- adaptive --------------------------------------------------------------------------
    def _qmodel(self, G, grads, delta, w, d0_zero, lam, buf):
        """Optimal (α, μ) and the model change M(δ)−M(0) for proposal ``delta`` (GGN products
        from the :class:`~curvlab.operators.LocalGGN` ``G`` at the current point)."""
        u = G.jvp(delta)
        self.counters["jvp"] += 1
        self.counters["ggn_products"] += 1
        damp = lam + self.hyper("weight_decay")
        m11 = float(G.quadratic(u, u) + damp * dot64(delta, delta))
        c1 = float(dot64(grads, delta))
        if d0_zero:
            M = torch.tensor([[m11]], dtype=torch.float64)
            c = torch.tensor([c1], dtype=torch.float64)
        else:
            m12 = float(G.quadratic(u, w) + damp * dot64(delta, buf))
            m22 = float(G.quadratic(w, w) + damp * dot64(buf, buf))
            c2 = float(dot64(grads, buf))
            M = torch.tensor([[m11, m12], [m12, m22]], dtype=torch.float64)
            c = torch.tensor([c1, c2], dtype=torch.float64)
        sol = -(torch.linalg.pinv(M) @ c)
        change = 0.5 * float(sol @ c)
        alpha = float(sol[0])
        mu = 0.0 if d0_zero else float(sol[1])
        return alpha, mu, change

    def _adaptive_update(self, inputs, targets, loss, grads, weights, rng, k):
        with replay_rng(rng):
            lin = linearize(self.model, self.params, inputs, update_buffers=False)
        G = LocalGGN.from_linearization(lin, self.rule, targets)
        self.counters["forward"] += 1
        buf = self.momentum_buffers
        d0_zero = all(not bool(b.any()) for b in buf)
        if d0_zero:
            w = None
        else:
            w = G.jvp(buf)
            self.counters["jvp"] += 1
        lam = self.damping
        wd = self.hyper("weight_decay")

        def candidate(gamma: float):
            delta = [-t for t in self._precondition(grads, gamma**2)]
            alpha, mu, change = self._qmodel(G, grads, delta, w, d0_zero, lam, buf)
            return delta, alpha, mu, change

        if k % self.gamma_interval == 0:
            omega2 = math.sqrt(19 / 20) ** self.gamma_interval
            gmin, gmax = self.gamma_bounds
            gammas = [max(omega2 * self.gamma, gmin), self.gamma, min(self.gamma / omega2, gmax)]
            results = [candidate(g) for g in gammas]
            changes = [r[3] if math.isfinite(r[3]) else math.inf for r in results]
            best = min(range(3), key=lambda i: changes[i])
            self.gamma = gammas[best]
            delta, alpha, mu, change = results[best]
        else:
            delta, alpha, mu, change = candidate(self.gamma)
        if not (math.isfinite(alpha) and math.isfinite(mu)):
            alpha, mu, change = 0.0, 0.0, 0.0
        step = [alpha * d + mu * b for d, b in zip(delta, buf)]
        rho = None
        if k % self.lambda_interval == 0:
            h_old = float(loss.to(torch.float64))
            if wd:
                h_old += 0.5 * wd * float(dot64(weights, weights))
            new_params = {n: w + s for (n, w), s in zip(
                ((n, p.detach()) for n, p in self.params.items()), step)}
            with torch.no_grad(), replay_rng(rng):
                new_out = torch.func.functional_call(
                    self.model, (new_params, cloned_buffers(self.model)), (inputs,))
            self.counters["forward"] += 1
            h_new = float(self.loss_fn(new_out, targets).to(torch.float64))
            if wd:
                h_new += 0.5 * wd * float(dot64(new_params.values(), new_params.values()))
            rho = (h_new - h_old) / change if change != 0.0 else math.nan
            self.set_hyper("damping", self.adjust_lambda(lam, rho, self.lambda_interval))
        self._set_momentum_buffers([s.clone() for s in step])
        self.last_proposal = delta
        self.diagnostics = {"alpha": alpha, "mu": mu, "qmodel_change": change, "rho": rho,
                            "damping": self.damping, "gamma": self.gamma}
        return step

    @staticmethod
    def adjust_lambda(damping: float, rho: float | None, interval: int = 5) -> float:
        """Levenberg–Marquardt rule: ``ρ < 1/4`` or NaN ⇒ ``λ/ω₁``; ``ρ > 3/4`` ⇒ ``λω₁``;
        ``ω₁ = (19/20)^interval``.

        Example:
            >>> AdaptiveKFACMixin.adjust_lambda(1.0, 0.1) > 1.0
            True
            >>> AdaptiveKFACMixin.adjust_lambda(1.0, 0.9) < 1.0
            True
        """
        omega1 = (19 / 20) ** interval
        if rho is None or math.isnan(rho) or rho < 0.25:
            return damping / omega1
        if rho > 0.75:
            return damping * omega1
        return damping
