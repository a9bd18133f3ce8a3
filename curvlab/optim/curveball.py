r"""CurveBall (Henriques, Ehrhardt, Albanie & Vedaldi, ICCV 2019): one curvature step per iteration.

Math (one global vector over all selected parameters, flat order of
:mod:`curvlab.func.params`). With model output :math:`\hat y = m(w)`, loss :math:`L(\hat y)` in
the reduction the loss function uses (``'mean'`` divides by the batch size as in the reference
code), :math:`J = \partial\hat y/\partial w`, :math:`H_L = \partial^2 L/\partial\hat y^2`,
gradient :math:`g = J^\top\nabla_{\hat y}L + \eta w` and damped Gauss-Newton matrix
:math:`\hat H = J^\top H_L J + (\lambda + \eta) I` (``η`` = ``weight_decay``, an ℓ2 term
:math:`\tfrac\eta2\lVert w\rVert^2` in gradient *and* curvature), each step does

.. math::

    \Delta z = \hat H z + g,\qquad z \leftarrow \rho z - \beta\,\Delta z,\qquad
    w \leftarrow w + \mathrm{lr}\; z .

:math:`\Delta z` comes out of ONE backward pass, :math:`J^\top(H_L J z + \nabla_{\hat y}L)`
(the gradient is part of the same vector-Jacobian product). ``ρ`` and ``β`` minimise the
quadratic model :math:`\hat f(s) = g^\top s + \tfrac12 s^\top\hat H s` over
``s = ρz − βΔz``: with :math:`u = Jz`, :math:`v = J\Delta z` (a second tangent through the
same linearization, no second forward),

.. math::

    A = \begin{bmatrix} v^\top H_L v + \mu\,\Delta z^\top\Delta z & u^\top H_L v + \mu\,
    \Delta z^\top z\\ \cdot & u^\top H_L u + \mu\, z^\top z\end{bmatrix},\quad
    b = \begin{bmatrix} g^\top\Delta z\\ g^\top z\end{bmatrix},\quad
    \begin{bmatrix}\beta\\-\rho\end{bmatrix} = A^{+} b

(``μ = λ + η``), solved in float64 with a pseudo-inverse, so at ``z = 0`` it gives the Cauchy
step ``ρ = 0``, ``β = gᵀg / gᵀĤg``. A user-fixed ``ρ`` or ``β`` is never overwritten; if only
one is fixed the other is the 1-D minimiser given it.

λ (``damping``, Levenberg–Marquardt style, reference semantics): on steps with
``steps % lambda_interval == 0`` (``steps`` starts at 0), after the update,
:math:`\gamma = (f(w_{new}) - f(w_{old}))/M` on the *same* mini-batch, with the predicted change
:math:`M = \hat f(\mathrm{lr}\,z_{new}) - \hat f(0)` (equals the reference
:math:`-\tfrac12(\beta b_1 - \rho b_2)` for ``lr = 1`` and automatic ``ρ, β``); with
``ω = lambda_factor ** lambda_interval``: ``γ < θ_low ⇒ λ ← λ/ω``, ``γ > θ_high ⇒ λ ← λω``.
``f`` includes the ℓ2 term. The re-evaluation forward replays the RNG state of the step's
forward (same dropout masks) and does not update BatchNorm running statistics; BatchNorm in
train mode normalises with batch statistics and is differentiated through them (as the MATLAB
original does).

Choices where the references disagree (see ``papers/curveball.md``):

* initial ``damping = 1.0`` (MATLAB ``CurveBall.m`` and the PyTorch examples' CLI; the PyTorch
  constructor uses 10, the README's no-BN example passes 10);
* λ adaptation applies to every loss (MATLAB restricts it to ``'logistic'``); turn it off with
  ``auto_lambda=False`` (the toy-problem configurations do);
* a non-finite loss, ``Δz``, ``A`` or ``b`` skips the step (MATLAB zeroes non-finite ρ/β);
* ``damping_units="loss"`` (default, as the references): λ is added to the curvature of the loss
  *as reduced*. The references' losses are batch means of per-example sums, so ``λ = 1`` there
  corresponds to ``λ = 1/D`` on a loss that also averages over ``D`` outputs per example
  (``nn.BCEWithLogitsLoss()``, ``nn.MSELoss()``). There the default over-damps by ``D``:
  ``Ĥ ≈ λI`` along ``z``, CurveBall degenerates to heavy-ball gradient descent with step ≈ 1/λ,
  and the λ rule, which moves λ by at most 0.5% every 5 steps, needs thousands of steps to
  correct it (``papers/deep_autoencoder.md``, "Why CurveBall stalls"). ``damping_units="example"``
  is the remedy: ``damping`` is then per example, i.e. the λ added to the curvature is
  ``damping · B / num_loss_terms`` for ``'mean'`` and ``damping · B`` for ``'sum'`` (B = batch
  size), the reference's scale whatever the loss reduction (a factor 1 for a batch-mean
  cross-entropy without spatial dimensions);
* ``(β, −ρ)`` from ``pinv`` (PyTorch port) rather than MATLAB's ``A \\ b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import linearize, loss_rule
from curvlab.func.params import ParamsArg
from curvlab.operators.local import LocalGGN
from curvlab.optim._common import check_hyper, dot64, evaluate_output, is_finite, rng_state
from curvlab.optim._compat import deprecated_alias, renamed_kwargs
from curvlab.optim.base import CurvatureOptimizer, SkipStep
from curvlab.optim.residual import ResidualModel  # re-exported: its old home

__all__ = ["CurveBall", "ResidualModel"]


class CurveBall(CurvatureOptimizer):
    r"""The CurveBall optimizer (see the module docstring for the exact update).

    Args:
        model: The network; its output must be a single tensor the loss accepts.
        loss_fn: ``loss_fn(output, target) -> scalar``; ``CrossEntropyLoss``, ``MSELoss``,
            ``BCEWithLogitsLoss`` use closed-form ``H_L`` (``curvlab.func.loss_rule``), others
            autodiff.
        lr: Outer step size ``w ← w + lr·z`` (1 in the paper's runs; 0.5 for Rosenbrock).
        damping: Initial damping ``λ >= 0`` (adapted in ``param_groups[...]["damping"]``).
            The old keyword ``lambd`` still works for one release (``DeprecationWarning``).
        momentum: ``ρ``; ``None`` = automatic each step (2×2 system), a number fixes it.
        beta: ``β``; ``None`` = automatic, a number fixes it.
        auto_lambda: Adapt ``λ`` by the ratio test every ``lambda_interval`` steps.
        lambda_interval, lambda_factor, lambda_thresholds: ``T``, ``ω₁`` and ``(θ_low, θ_high)``.
        weight_decay: ``η`` of the ℓ2 term ``(η/2)‖w‖²`` (gradient ``ηw``, curvature ``ηI``).
        damping_units: ``"loss"`` (default, reference behaviour): ``damping`` is λ for the loss
            as reduced. ``"example"``: ``damping`` is per example (the references' batch-mean of
            per-example sums); the λ used is ``damping · B / num_loss_terms`` for a ``'mean'``
            loss, ``damping · B`` for ``'sum'`` (e.g. ``damping / D`` for a pixel-averaged
            ``BCEWithLogitsLoss`` on ``D`` outputs). Needs an ``nn.Module`` loss with
            ``reduction`` ``'mean'`` or ``'sum'``. λ adaptation acts on ``damping`` either way.
        params: Parameter selection (see :func:`curvlab.func.select_params`); default all
            trainable parameters.
        engine: Linearization engine passed to :func:`curvlab.func.linearize`.

    ``lr``, ``damping``, ``momentum``, ``beta`` and ``weight_decay`` live in ``param_groups``
    (one value over all groups: CurveBall's vector is global), so ``torch.optim.lr_scheduler``
    drives them. The velocity ``z`` is ``state[p]["z"]``. The products come from one
    :class:`curvlab.operators.LocalGGN` per step.

    Counters (``opt.counters``): ``forward`` (model forwards, including the λ test), ``jvp``,
    ``backward``, ``ggn_products`` (1 per step: ``Ĥz``), ``steps``, ``skipped_steps``.
    ``diagnostics``: ``rho``, ``beta``, ``damping``, ``predicted_change``, ``ratio``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> opt = CurveBall(net, torch.nn.CrossEntropyLoss())
        >>> losses = [opt.step(x, y).item() for _ in range(20)]
        >>> losses[-1] < losses[0]
        True
    """

    global_hypers = ("lr", "damping", "momentum", "beta", "weight_decay")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lr: float = 1.0,
        damping: float | None = None,
        momentum: float | None = None,
        beta: float | None = None,
        auto_lambda: bool = True,
        lambda_interval: int = 5,
        lambda_factor: float = 0.999,
        lambda_thresholds: tuple[float, float] = (0.5, 1.5),
        weight_decay: float = 0.0,
        damping_units: str = "loss",
        params: ParamsArg = None,
        engine: str = "auto",
        **deprecated: Any,
    ) -> None:
        damping = renamed_kwargs("CurveBall", deprecated, {"lambd": "damping"},
                                 {"damping": damping}).get("damping", damping)
        defaults = {
            "lr": check_hyper("lr", lr, minimum=0.0, strict=True),
            "damping": check_hyper("damping", 1.0 if damping is None else damping, minimum=0.0),
            "momentum": check_hyper("momentum", momentum, allow_none=True),
            "beta": check_hyper("beta", beta, allow_none=True),
            "weight_decay": check_hyper("weight_decay", weight_decay, minimum=0.0),
        }
        super().__init__(model, loss_fn, params, defaults)
        self.rule = loss_rule(loss_fn)
        if damping_units not in ("loss", "example"):
            raise ValueError(f"damping_units must be 'loss' or 'example', got {damping_units!r}")
        if damping_units == "example" and self.rule.reduction not in ("mean", "sum"):
            raise ValueError("damping_units='example' needs an nn.Module loss with reduction "
                             f"'mean' or 'sum'; {self.rule.name} has {self.rule.reduction!r}")
        self.damping_units = damping_units
        if not isinstance(auto_lambda, bool):
            raise TypeError(f"auto_lambda must be a bool, got {type(auto_lambda).__name__}")
        self.auto_lambda = auto_lambda
        if isinstance(lambda_interval, bool) or not isinstance(lambda_interval, int) \
                or lambda_interval < 1:
            raise ValueError(f"lambda_interval must be an int >= 1, got {lambda_interval!r}")
        self.lambda_interval = lambda_interval
        self.lambda_factor = check_hyper("lambda_factor", lambda_factor, minimum=0.0, strict=True)
        if self.lambda_factor > 1.0:
            raise ValueError(f"lambda_factor must be in (0, 1], got {lambda_factor}")
        if not isinstance(lambda_thresholds, Sequence) or len(lambda_thresholds) != 2:
            raise ValueError(
                f"lambda_thresholds must be a pair (low, high), got {lambda_thresholds!r}"
            )
        low = check_hyper("lambda_thresholds[0]", lambda_thresholds[0])
        high = check_hyper("lambda_thresholds[1]", lambda_thresholds[1])
        if low > high:
            raise ValueError(f"lambda_thresholds must satisfy low <= high, got {lambda_thresholds}")
        self.lambda_thresholds = (low, high)
        if engine not in ("auto", "layerwise", "functional"):
            raise ValueError(f"engine must be 'auto', 'layerwise' or 'functional', got {engine!r}")
        self.engine = engine
        self._residual = isinstance(model, ResidualModel)
        self.diagnostics = {"rho": None, "beta": None, "damping": defaults["damping"],
                            "predicted_change": None, "ratio": None}

    # ------------------------------------------------------------------------------------
    @classmethod
    def for_residuals(
        cls, residual_fn: Callable[[list[Tensor], Any], Tensor], params: Sequence[Tensor],
        **kwargs: Any,
    ) -> CurveBall:
        r"""CurveBall on :math:`f(w) = \lVert r(w)\rVert^2` for ``residual_fn(params, inputs)``.

        Builds a :class:`ResidualModel` with ``nn.MSELoss(reduction="sum")`` (``H_L = 2I``)
        and the functional linearization engine. Call ``opt.step(inputs)``: ``inputs`` (e.g.
        the noise ``ε`` of this step) is passed to ``residual_fn`` and reused for the λ test;
        targets default to zero.

        Example:
            >>> w = torch.tensor([-0.25, -0.25], dtype=torch.float64)
            >>> def res(p, eps):
            ...     u, v = p[0]
            ...     return torch.stack([10 * eps * (v - u**2), 1 - u])
            >>> opt = CurveBall.for_residuals(res, [w], damping=0.1, lr=0.5, auto_lambda=False)
            >>> for _ in range(300):
            ...     loss = opt.step(1.0)
            >>> bool(loss < 1e-4)
            True
        """
        kwargs.setdefault("engine", "functional")
        return cls(ResidualModel(residual_fn, params), nn.MSELoss(reduction="sum"), **kwargs)

    # ------------------------------------------------------------------------------------
    @property
    def velocity(self) -> list[Tensor]:
        """``z``, one tensor per selected parameter (``state[p]["z"]``; zeros before step 1)."""
        return [self.state[p]["z"] if "z" in self.state[p] else torch.zeros_like(p)
                for p in self.params.values()]

    def _set_velocity(self, z: Sequence[Tensor]) -> None:
        for p, zi in zip(self.params.values(), z, strict=True):
            self.state[p]["z"] = zi

    def _objective(self, out: Tensor, targets: Tensor, weights: list[Tensor]) -> Tensor:
        loss = self.rule.value(out, targets).detach().to(torch.float64)
        wd = self.hyper("weight_decay")
        if wd:
            loss = loss + 0.5 * wd * dot64(weights, weights)
        return loss

    def _solve(self, A: Tensor, b: Tensor) -> tuple[float, float]:
        """``(ρ, β)`` from the float64 2×2 system, honouring user-fixed values."""
        rho_fixed, beta_fixed = self.hyper("momentum"), self.hyper("beta")
        if rho_fixed is None and beta_fixed is None:
            x = torch.linalg.pinv(A) @ b
            return -float(x[1]), float(x[0])
        a11, a12, a22 = float(A[0, 0]), float(A[0, 1]), float(A[1, 1])
        b1, b2 = float(b[0]), float(b[1])
        if rho_fixed is not None and beta_fixed is not None:
            return rho_fixed, beta_fixed
        if rho_fixed is not None:  # minimise over beta given rho: A11 β = b1 + A12 ρ
            return rho_fixed, ((b1 + a12 * rho_fixed) / a11 if a11 > 0 else 0.0)
        # beta fixed: A22 (−ρ) = b2 − A12 β
        return (-(b2 - a12 * beta_fixed) / a22 if a22 > 0 else 0.0), beta_fixed

    def effective_damping(self, output: Tensor, targets: Tensor | None = None) -> float:
        """The λ added to the loss curvature for a batch ``output`` (``damping_units``)."""
        lam = self.hyper("damping")
        if self.damping_units == "loss":
            return lam
        batch = self.rule.num_examples(output)
        if self.rule.reduction == "sum":
            return lam * batch
        return lam * batch / self.rule.num_loss_terms(output, targets)

    def _products(self, G: LocalGGN, weights: list[Tensor], count: bool, targets: Tensor
                  ) -> tuple[list[Tensor], Tensor]:
        """``Δz`` and the float64 CPU vector ``(A11, A12, A22, b1, b2)`` at ``G``'s point."""
        out = G.output
        wd = self.hyper("weight_decay")
        mu = self.effective_damping(out, targets) + wd
        z = self.velocity
        z_is_zero = not bool(torch.stack([t.any() for t in z]).any())
        if z_is_zero:
            u = torch.zeros_like(out)
            hu = u
        else:
            u = G.jvp(z)
            hu = G.output_hvp(u)
        dz = G.vjp(hu + G.grad_output, retain_graph=False)
        if mu or wd:
            dz = [d + mu * zi + wd * w if wd else d + mu * zi
                  for d, zi, w in zip(dz, z, weights, strict=True)]
        v = G.jvp(dz)
        if count:
            self.counters["jvp"] += 1 if z_is_zero else 2
            self.counters["backward"] += 1
            self.counters["ggn_products"] += 1
        entries = [
            G.quadratic(v, v) + mu * dot64(dz, dz),
            G.quadratic(u, v) + mu * dot64(dz, z),
            G.quadratic(u, u) + mu * dot64(z, z),
            G.gradient_dot(v),
            G.gradient_dot(u),
        ]
        if wd:
            entries[3] = entries[3] + wd * dot64(weights, dz)
            entries[4] = entries[4] + wd * dot64(weights, z)
        return dz, torch.stack([e.to(torch.float64) for e in entries]).cpu()

    def _local_ggn(self, inputs: Any, targets: Tensor | None, update_buffers: bool
                   ) -> tuple[LocalGGN, Tensor]:
        lin = linearize(self.model, self.params, inputs, update_buffers=update_buffers,
                        engine=self.engine)
        targets = self._targets(lin.output.detach(), targets)
        return LocalGGN.from_linearization(lin, self.rule, targets), targets

    def quadratic_model(self, inputs: Any, targets: Tensor | None = None) -> dict[str, Any]:
        r"""``Δz``, ``A``, ``b`` and the loss at the current ``w`` and ``z``, changing nothing.

        Diagnostic twin of :meth:`step` (no buffer update, no counters): ``delta_z`` (list like
        the parameters) is :math:`\hat H z + g`, ``A`` (2×2) and ``b`` (2,) the float64 system
        of the module docstring.
        """
        G, targets = self._local_ggn(inputs, targets, update_buffers=False)
        weights = [p.detach() for p in self.params.values()]
        dz, vals = self._products(G, weights, count=False, targets=targets)
        a11, a12, a22, b1, b2 = vals.tolist()
        return {
            "loss": G.loss,
            "delta_z": dz,
            "A": torch.tensor([[a11, a12], [a12, a22]], dtype=torch.float64),
            "b": torch.tensor([b1, b2], dtype=torch.float64),
        }

    def _targets(self, out: Tensor, targets: Tensor | None) -> Tensor:
        if targets is not None:
            return targets
        if not self._residual:
            raise ValueError(
                "CurveBall.step: targets is None; only models built by "
                "CurveBall.for_residuals default to zero targets"
            )
        return torch.zeros_like(out)

    def _reevaluate(self, inputs: Any, rng: Any) -> Tensor:
        """Model output at the current parameters with the RNG (dropout masks) of ``rng`` and
        no buffer update (BatchNorm in train mode uses batch statistics)."""
        return evaluate_output(self.model, self.params, inputs, rng, self.engine)

    def _adapt_lambda(self, ratio: float) -> None:
        omega = self.lambda_factor**self.lambda_interval
        low, high = self.lambda_thresholds
        if ratio < low:
            self.set_hyper("damping", self.hyper("damping") / omega)
        elif ratio > high:
            self.set_hyper("damping", self.hyper("damping") * omega)

    def step(self, inputs: Any, targets: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """One CurveBall iteration on the mini-batch; returns the loss before the update.

        The returned value is the data loss ``loss_fn(model(inputs), targets)`` (without the
        ℓ2 term), detached, 0-dim. ``targets`` may be omitted for :meth:`for_residuals`.
        """
        if targets is None and not self._residual:
            self._targets(None, None)  # type: ignore[arg-type]  (raises the clear error)
        return super().step(inputs, targets if targets is not None else _NO_TARGETS)

    def _step(self, inputs: Any, targets: Any) -> Tensor:
        targets = None if targets is _NO_TARGETS else targets
        params = list(self.params.values())
        weights = [p.detach() for p in params]
        rng = rng_state([*params, *[t for t in (inputs, targets) if isinstance(t, Tensor)]])
        G, targets = self._local_ggn(inputs, targets, update_buffers=True)
        self.counters["forward"] += 1
        out = G.output
        loss = G.loss
        dz, vals = self._products(G, weights, count=True, targets=targets)
        if not (math.isfinite(float(loss)) and bool(torch.isfinite(vals).all())):
            raise SkipStep("loss or curvature (loss, Δz, A or b)", loss)
        a11, a12, a22, b1, b2 = (float(t) for t in vals)
        A = torch.tensor([[a11, a12], [a12, a22]], dtype=torch.float64)
        b = torch.tensor([b1, b2], dtype=torch.float64)
        rho, beta = self._solve(A, b)
        if not (math.isfinite(rho) and math.isfinite(beta)):
            raise SkipStep("momentum/step size from the 2x2 system", loss)

        # quadratic model change of the step actually taken, s = lr (rho z - beta dz)
        lr = self.hyper("lr")
        x = torch.tensor([beta, -rho], dtype=torch.float64)
        predicted = lr * float(-(x @ b)) + 0.5 * lr**2 * float(x @ A @ x)

        new_z = [rho * zi - beta * d for zi, d in zip(self.velocity, dz, strict=True)]
        if not is_finite(*new_z):
            raise SkipStep("update direction z", loss)
        lambda_test = self.auto_lambda and self.steps % self.lambda_interval == 0
        # (weights alias the parameters: evaluate the old objective before the update)
        old_obj = float(self._objective(out, targets, weights)) if lambda_test else 0.0
        with torch.no_grad():
            for p, zi in zip(params, new_z, strict=True):
                p.add_(zi, alpha=lr)
        self._set_velocity(new_z)

        ratio = None
        if lambda_test:
            new_out = self._reevaluate(inputs, rng)
            self.counters["forward"] += 1
            new_obj = float(self._objective(new_out, targets, [p.detach() for p in params]))
            if predicted != 0.0 and math.isfinite(new_obj):
                ratio = (new_obj - old_obj) / predicted
                self._adapt_lambda(ratio)
        self.diagnostics = {"rho": rho, "beta": beta, "damping": self.hyper("damping"),
                            "predicted_change": predicted, "ratio": ratio}
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (checks the shapes of ``z``)."""
        for (n, p), s in zip(self.params.items(), state_dict["state"].values(), strict=False):
            zi = s.get("z") if isinstance(s, dict) else None
            if zi is not None and zi.shape != p.shape:
                raise ValueError(f"CurveBall.load_state_dict: z for {n!r} has shape "
                                 f"{tuple(zi.shape)}, expected {tuple(p.shape)}")
        super().load_state_dict(state_dict)

    # ---- deprecated names ----------------------------------------------------------------
    lambd = deprecated_alias("lambd", 'hyper("damping")', lambda self: self.hyper("damping"),
                             lambda self, v: self.set_hyper("damping", float(v)))
    count = deprecated_alias("count", "steps", lambda self: self.steps,
                             lambda self, v: self.counters.__setitem__("steps", int(v)))
    z = deprecated_alias("z", "velocity (state[p]['z'])", lambda self: self.velocity,
                         lambda self, v: self._set_velocity(v))

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"CurveBall(lr={g['lr']}, damping={g['damping']}, momentum={g['momentum']}, "
            f"beta={g['beta']}, auto_lambda={self.auto_lambda}, "
            f"weight_decay={g['weight_decay']}, damping_units={self.damping_units!r})"
        )


#: Marker for "no targets" (the base class's step needs a non-None argument).
_NO_TARGETS = object()
