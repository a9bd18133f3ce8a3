r"""K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) as a curvlab
optimizer, :class:`KFACOptimizer`, with the ``loss = opt.step(inputs, targets)`` interface
(``curvlab.optim.KFAC`` is its deprecated old name).

Curvature. Per supported layer (``nn.Linear``, ``nn.Conv2d``; a grouped convolution gets one
block per group; a layer called several times, i.e. shared weights, follows K-FAC-expand) the
block of the Fisher/GGN is approximated by ``G ⊗ A`` in curvlab's flat order inside the gradient
matrix ``V = [∇W | ∇b]``, held by the one Kronecker engine :class:`curvlab.kfac.KroneckerEngine`
(see :mod:`curvlab.kfac.factors` for the exact factor scaling: per-example expectations, so that
``A ⊗ G`` equals the GGN block of a mean/sum-reduced loss where the factorization is exact).
``fisher``:

* ``'mc'`` (default): true Fisher with ``mc_samples`` targets drawn from the model
  (``rule.sample_grads``), one extra backward to the layer outputs on covariance steps;
* ``'type2'``: exact expectation over the model distribution, one backward per column of the
  loss Hessian's square root (number of outputs per example);
* ``'empirical'``: output derivatives of the actual loss (no extra backward), rescaled by ``N``
  for ``reduction='mean'`` (spec §0).

Factors are exponential moving averages with warm start ``ε_k = min(1 − 1/k, ema_decay)``
(k = number of covariance updates), updated every ``cov_interval`` steps, computed in float32
(float64 for float64 parameters) with autocast disabled; non-finite statistics are dropped with a
warning. Eigendecompositions are refreshed every ``inv_interval`` steps and on the first three
steps (guarded: symmetrize, NaN check, float64 retry, last good decomposition kept on failure).

Update (``adaptive=False``). ``h(θ) = L(θ) + (η/2)‖θ‖²`` with ``η = weight_decay``;
``p = F̆⁻¹ ∇h`` per layer with damping ``λ = damping`` (``inverse='eigen'``: Tikhonov on the
product ``(G⊗A + λI)⁻¹``; ``'factored'``: π-adjusted ``(G + √λ/π I)⁻¹ V (A + π√λ I)⁻¹``);
parameters of unsupported modules get the plain gradient ``∇h`` (identity preconditioner) and a
warning naming them. Optional KL clip ``ν = min(1, sqrt(kl_clip / |Σ lr²⟨p, ∇h⟩|))``, ``p ← νp``
(spec §7). Momentum is SGD-style on the preconditioned direction (``momentum_type='regular'``
in TF-KFAC's naming, KFC-pre): ``b ← μ b + p``, ``θ ← θ − lr·b``.

Update (``adaptive=True``, Martens & Grosse §6–7, spec §1.4–§1.8). ``lr`` and ``momentum`` are
ignored. The proposal ``Δ = −F̆_γ⁻¹∇h`` uses the preconditioner damping ``γ²`` (``'eigen'``:
``(G⊗A + γ²I)⁻¹``; ``'factored'``: Martens' ``(A + πγI) ⊗ (G + γ/π I)``); the step is
``δ = αΔ + μδ₀`` (``δ₀`` = previous step) with ``(α, μ)`` minimizing the quadratic model
``M(δ) = h + ∇hᵀδ + ½ δᵀ(F + (λ+η)I)δ`` with the exact mini-batch GGN ``F`` (products
``vᵀFw = (Jv)ᵀ H_L (Jw)`` through :func:`curvlab.func.linearize` and ``rule.hessian_vp``),
solved in float64 with a pseudo-inverse (1×1 when ``δ₀ = 0``). Every ``lambda_interval = T1``
steps ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` on the same mini-batch (no BatchNorm running-stat
update, dropout masks replayed): ``ρ < 1/4`` (or NaN) ⇒ ``λ ← λ/ω₁``, ``ρ > 3/4`` ⇒ ``λ ← λω₁``,
``ω₁ = (19/20)^{T1}``. Every ``gamma_interval = T2`` steps a greedy 3-point search over
``{max(ω₂γ, γ_min), γ, min(γ/ω₂, γ_max)}``, ``ω₂ = sqrt(19/20)^{T2}``, keeps the γ whose
optimal ``δ`` has the smallest ``M(δ)``; ``γ ∈ [sqrt(η), 1]``. Initial ``λ = damping`` (Martens
used 150 for autoencoders, 1 "usually more appropriate for classification nets") and
``γ = initial_gamma`` (default ``sqrt(λ + η)``). Cost: one extra forward (the linearization for
the exact products, since hooks cannot capture factors inside it) plus 1–2 tangent passes per
step, 2 more per γ candidate, and one more forward on ρ steps.

Structure ``'block-tridiagonal'`` (a chain of ``nn.Linear`` layers): the inverse is Martens &
Grosse's ``F̂⁻¹ = Ξᵀ Λ Ξ`` from :class:`curvlab.kfac.tridiagonal.TridiagonalInverse` with the
factored damping of the diagonal blocks (whatever ``inverse`` says).

Robustness. A non-finite loss or gradient skips the step: parameters, BatchNorm buffers and all
optimizer state (factors, inverses, momentum, λ, γ, counters other than ``skipped_steps``,
generator) are unchanged, and a ``RuntimeWarning`` is issued.

Hyperparameters ``lr``, ``momentum``, ``damping`` (in adaptive mode: the current λ, updated
in place) and ``weight_decay`` live in ``param_groups`` (``lr``, ``momentum`` and ``weight_decay``
may differ between groups; ``damping`` may not), so ``torch.optim.lr_scheduler`` drives them.

Counters: ``forward``, ``backward`` (the gradient backward and each extra backward to the layer
outputs), ``jvp``, ``ggn_products``, ``steps``, ``skipped_steps``, ``factor_updates``,
``inverse_updates``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import loss_rule
from curvlab.func.params import ParamsArg, batch_size_of
from curvlab.kfac import (
    FactorCapture,
    KFACLayer,
    KroneckerEngine,
    LayerStatistics,
    register_layers,
)
from curvlab.kfac.distributed import DistributedKFAC, wants_distributed
from curvlab.kfac.refresh import FixedRefresh, RefreshPolicy
from curvlab.optim._common import check_hyper, check_int, dot64, is_finite, rng_state
from curvlab.optim.base import CurvatureOptimizer, SkipStep
from curvlab.optim.kfac_adaptive import AdaptiveKFACMixin

__all__ = ["KFACOptimizer"]

_FISHERS = ("mc", "type2", "empirical")


def _autocast_off(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class KFACOptimizer(AdaptiveKFACMixin, CurvatureOptimizer):
    r"""K-FAC optimizer (see the module docstring for the exact update and conventions).

    Args:
        model: The network (single-tensor output).
        loss_fn: ``loss_fn(output, targets) -> scalar``; MC and type-2 Fisher need
            ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        lr: Step size (ignored when ``adaptive=True``).
        momentum: SGD-style momentum on the preconditioned direction (ignored when adaptive).
        damping: ``λ`` of the preconditioner; with ``adaptive=True`` the initial LM ``λ``.
        weight_decay: ``η`` of the ℓ2 term ``(η/2)‖θ‖²`` (gradient; quadratic model).
        fisher: ``'mc'``, ``'type2'`` or ``'empirical'``.
        ema_decay: Maximal EMA weight of old statistics (0.95).
        cov_interval, inv_interval: Steps between factor updates / eigendecompositions.
        inverse: ``'eigen'`` or ``'factored'``.
        kl_clip: KL clip ``c`` (``None``: off; not used in adaptive mode).
        adaptive: Martens & Grosse's (α, μ) quadratic-model steps with LM λ and γ search.
        ekfac: EKFAC rescaling in the Kronecker eigenbasis (``inverse='eigen'``).
        structure: ``'block-diagonal'`` or ``'block-tridiagonal'`` (chains of ``nn.Linear``
            layers, Martens & Grosse §4.3 via :mod:`curvlab.kfac.tridiagonal`; cross-layer
            factors ``A_{i,i+1}``, ``G_{i,i+1}`` are EMA'd with the diagonal ones and the
            damping is always the π-split factored Tikhonov of the diagonal blocks).
        mc_samples: Monte-Carlo samples per example for ``fisher='mc'``.
        generator: ``torch.Generator`` for the Monte-Carlo targets (default: a private one
            seeded from the global RNG at construction; saved in ``state_dict``).
        params: Parameter selection (default all trainable), or torch-style parameter groups.
        strict: Raise instead of warning when selected parameters belong to unsupported modules.
        initial_gamma: Initial γ (adaptive; default ``sqrt(damping + weight_decay)``).
        lambda_interval, gamma_interval: ``T1`` and ``T2`` (adaptive; 5 and 20).
        num_forced_inverses: Steps at the start on which inverses are always refreshed (3).
        refresh: A refresh policy (:mod:`curvlab.kfac.refresh`: ``FixedRefresh``,
            ``AdaptiveRefresh`` for SP-NGD's stale statistics, ``TraceRefresh`` /
            ``FrequencyRefresh`` for THOR); default ``FixedRefresh(cov_interval, inv_interval,
            num_forced_inverses)``. Layers whose statistics are not due get no factor products,
            and no sampled backward runs when no layer needs a new ``G``.
        split_dim: THOR's block splitting of factors larger than ``split_dim``
            (:mod:`curvlab.kfac.split`); ``None``: no splitting.
        unitwise: SP-NGD's unit-wise natural gradient for BatchNorm/LayerNorm/GroupNorm
            affine parameters (default, :mod:`curvlab.kfac.unitwise`); ``False``: they get
            the plain gradient.
        kfac_approx: ``'expand'`` (default) or ``'reduce'`` (Eschenhagen et al. 2023) for
            layers applied at several positions (:func:`curvlab.kfac.factors.reduce_shared`).
        stats_fraction: Factors from the first ``⌈f·N⌉`` examples of each batch (Martens &
            Grosse: 1/8), rescaled to the batch (:class:`curvlab.kfac.KroneckerEngine`).
        distributed, distributed_mode, grad_worker_fraction, process_group,
            distributed_options: Distributed K-FAC (:mod:`curvlab.kfac.distributed`;
            construct after ``init_process_group``). ``distributed=None`` runs distributed
            when a group of more than one rank is initialized; ``distributed_mode``
            ``'kaisa'`` (default; ``grad_worker_fraction`` 1 = COMM-OPT, ``1/W`` = MEM-OPT)
            or ``'sp-ngd'``; ``distributed_options``: ``strategy``, ``symmetry_aware``,
            ``bucket_cap_mb``, ``emulate``. ``assignment`` and ``comm_stats()`` inspect it.

    Attributes:
        engine: The :class:`~curvlab.kfac.KroneckerEngine` (factors, inverses, EKFAC).
        layers: Registered layers; ``unsupported``: names of parameters without a block.
        gamma: Current γ (adaptive mode).
        diagnostics: ``alpha``, ``mu``, ``qmodel_change``, ``rho``, ``damping``, ``gamma``
            (adaptive) or ``kl_nu`` (KL clip) of the last step.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = KFACOptimizer(net, torch.nn.CrossEntropyLoss(), lr=0.1, damping=0.1)
        >>> losses = [opt.step(x, y).item() for _ in range(10)]
        >>> losses[-1] < losses[0]
        True
    """

    global_hypers = ("damping",)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lr: float = 1.0,
        momentum: float = 0.9,
        damping: float,
        weight_decay: float = 0.0,
        fisher: str = "mc",
        ema_decay: float = 0.95,
        cov_interval: int = 1,
        inv_interval: int = 20,
        inverse: str = "eigen",
        kl_clip: float | None = None,
        adaptive: bool = False,
        ekfac: bool = False,
        structure: str = "block-diagonal",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        params: ParamsArg = None,
        strict: bool = False,
        initial_gamma: float | None = None,
        lambda_interval: int = 5,
        gamma_interval: int = 20,
        num_forced_inverses: int = 3,
        refresh: RefreshPolicy | None = None,
        split_dim: int | None = None,
        unitwise: bool = True,
        kfac_approx: str = "expand",
        stats_fraction: float = 1.0,
        distributed: bool | None = None,
        distributed_mode: str | None = None,
        grad_worker_fraction: float | None = None,
        process_group: Any = None,
        distributed_options: dict[str, Any] | None = None,
    ) -> None:
        defaults = {
            "lr": check_hyper("lr", lr, minimum=0.0, strict=True),
            "momentum": check_hyper("momentum", momentum, minimum=0.0),
            "damping": check_hyper("damping", damping, minimum=0.0),
            "weight_decay": check_hyper("weight_decay", weight_decay, minimum=0.0),
        }
        super().__init__(model, loss_fn, params, defaults)
        self.rule = loss_rule(loss_fn)
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}")
        self.fisher = fisher
        self.ema_decay = check_hyper("ema_decay", ema_decay, minimum=0.0)
        if self.ema_decay >= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        cov_interval = check_int("cov_interval", cov_interval)
        inv_interval = check_int("inv_interval", inv_interval)
        self.kl_clip = check_hyper("kl_clip", kl_clip, minimum=0.0, strict=True, allow_none=True)
        self.adaptive = bool(adaptive)
        self.mc_samples = check_int("mc_samples", mc_samples)
        self.lambda_interval = check_int("lambda_interval", lambda_interval)
        self.gamma_interval = check_int("gamma_interval", gamma_interval)
        self.num_forced_inverses = check_int("num_forced_inverses", num_forced_inverses, 0)
        table = register_layers(model, self.params, strict=strict, who=type(self).__name__,
                                fallback="these parameters get the plain gradient "
                                "(identity preconditioner)",
                                unitwise=unitwise)
        self.layers: list[KFACLayer] = list(table.layers)
        self.unsupported: list[str] = [n for ps in table.unsupported.values() for n in ps]
        reduction = self.rule.reduction if self.rule.reduction in ("mean", "sum") else "mean"
        self.engine = KroneckerEngine(
            table, fisher=fisher, reduction=reduction, mc_samples=self.mc_samples,
            inverse=inverse, ekfac=ekfac, ema_decay=self.ema_decay, structure=structure,
            split_dim=split_dim, kfac_approx=kfac_approx, stats_fraction=stats_fraction,
            refresh=refresh if refresh is not None else FixedRefresh(
                cov_interval, inv_interval, self.num_forced_inverses))
        self.refresh_policy = self.engine.policy
        self.inverse, self.ekfac, self.structure = inverse, bool(ekfac), structure
        self.norm_layers = list(table.norm)
        self.capture = FactorCapture([*self.layers, *self.norm_layers])
        self.device = next(iter(self.params.values())).device
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator
        gmin = math.sqrt(defaults["weight_decay"])
        self.gamma_bounds = (gmin, 1.0)
        if initial_gamma is None:
            initial_gamma = math.sqrt(defaults["damping"] + defaults["weight_decay"])
        self.gamma = check_hyper("initial_gamma", initial_gamma, minimum=0.0)
        self.gamma = min(max(self.gamma, gmin), 1.0)
        self.counters.update(factor_updates=0, inverse_updates=0)
        #: The proposal Δ of the last adaptive step (diagnostics, tests).
        self.last_proposal: list[Tensor] | None = None
        # -- distributed K-FAC (curvlab.kfac.distributed): gradients averaged here --
        self.dist: DistributedKFAC | None = None
        if wants_distributed(distributed, distributed_mode, grad_worker_fraction, process_group,
                             type(self).__name__):
            if self.adaptive or (self.kl_clip is not None and distributed_mode == "sp-ngd"):
                raise ValueError(f"{type(self).__name__}: distributed K-FAC does not support "
                                 "adaptive=True, nor kl_clip with distributed_mode='sp-ngd'")
            self.dist = DistributedKFAC(
                self.engine, self.params, mode=distributed_mode or "kaisa",
                grad_worker_fraction=grad_worker_fraction, group=process_group,
                who=type(self).__name__, **(distributed_options or {}))

    # ---- helpers -------------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        return [self.generator]

    @property
    def momentum_buffers(self) -> list[Tensor]:
        """Momentum (plain mode) or previous step δ₀ (adaptive), one per parameter."""
        return [self.state[p]["momentum_buffer"] if "momentum_buffer" in self.state[p]
                else torch.zeros_like(p) for p in self.params.values()]

    def _set_momentum_buffers(self, bufs: Sequence[Tensor]) -> None:
        for p, b in zip(self.params.values(), bufs, strict=True):
            self.state[p]["momentum_buffer"] = b

    @property
    def cov_interval(self) -> int | None:
        """``cov_interval`` of a :class:`FixedRefresh` policy (``None`` for other policies)."""
        return getattr(self.refresh_policy, "cov_interval", None)

    @cov_interval.setter
    def cov_interval(self, value: int) -> None:
        self.refresh_policy.cov_interval = check_int("cov_interval", value)

    @property
    def inv_interval(self) -> int | None:
        """``inv_interval`` of a :class:`FixedRefresh` policy (``None`` for other policies)."""
        return getattr(self.refresh_policy, "inv_interval", None)

    @inv_interval.setter
    def inv_interval(self, value: int) -> None:
        self.refresh_policy.inv_interval = check_int("inv_interval", value)

    @property
    def refresh_log(self) -> list[dict[str, Any]]:
        """Tidy rows of what was refreshed when (see :mod:`curvlab.kfac.refresh`)."""
        return self.refresh_policy.refresh_log

    @property
    def damping(self) -> float:
        """Current damping ``λ`` (``param_groups[...]['damping']``)."""
        return float(self.hyper("damping"))

    def memory_usage(self) -> dict[str, int]:
        """Bytes held by the Kronecker factors, by the inverses, and their total."""
        return self.engine.memory_bytes()

    def _precon_damping(self) -> float:
        return self.gamma**2 if self.adaptive else self.damping

    # ---- forward / backward --------------------------------------------------------------
    def _forward_backward(self, inputs: Any, targets: Tensor, cov: bool, sample: bool = True):
        """Training forward (capturing layer inputs and, through tensor hooks, output
        derivatives on covariance steps), loss, gradients and the extra Fisher backward passes
        (when ``sample``). Returns ``(loss, output, grads, passes)``; raises
        :class:`SkipStep` when non-finite."""
        params = list(self.params.values())
        self.capture.clear()
        torch.clear_autocast_cache()  # parameters changed in place since the last forward
        if cov:
            with self.capture:
                out = self.model(inputs)
        else:
            out = self.model(inputs)
        self.counters["forward"] += 1
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self).__name__}: the model must return a single tensor, "
                            f"got {type(out)}")
        self.rule.check(out, targets)
        loss = self.loss_fn(out, targets)
        if not bool(torch.isfinite(loss.detach())):
            self.capture.clear()
            raise SkipStep("loss", loss.detach())
        extra = cov and sample and self.fisher != "empirical"
        res = torch.autograd.grad(loss, params, retain_graph=extra, allow_unused=True)
        self.counters["backward"] += 1
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(res, params)]
        if not is_finite(*grads):
            self.capture.clear()
            raise SkipStep("gradient", loss.detach())
        passes = 0
        if extra:
            if self.fisher == "mc":
                vectors = self.rule.sample_grads(out.detach(), self.mc_samples, self.generator,
                                                  target=targets)
            else:
                vectors = self.rule.sqrt_hessian(out.detach(), targets)
            # extra passes stop at the layer outputs (no weight-gradient products), unless an
            # output was modified in place
            weights = self.capture.backward_targets()
            for j, vec in enumerate(vectors):
                torch.autograd.grad(out, weights, vec.to(out.dtype),
                                    retain_graph=j < len(vectors) - 1, allow_unused=True)
                self.counters["backward"] += 1
            passes = len(vectors)
        return loss.detach(), out.detach(), grads, passes

    def _statistics(self, num_examples: int, passes: int, due):
        stats = self.engine.statistics(
            self.capture, num_examples, passes=None if self.fisher == "empirical" else passes,
            due=due)
        got = set(stats.A) | set(stats.G) | set(stats.F)
        missing = [la.name for la in [*self.layers, *self.norm_layers] if any(due[la.name])
                   and la.name not in got]
        if missing:
            warnings.warn(f"{type(self).__name__}: layers {missing} received no statistics "
                          "(module not called through its forward, or output not reaching the "
                          "loss); they keep their old factors or the plain gradient",
                          RuntimeWarning, stacklevel=3)
        if self.dist is None and not stats.is_finite():  # distributed: checked after reduce
            warnings.warn(f"{type(self).__name__}: non-finite curvature statistics; factors not "
                          "updated this step", RuntimeWarning, stacklevel=3)
            return None
        return stats

    # ---- preconditioning -----------------------------------------------------------------
    def _precondition(self, grads: Sequence[Tensor], damping: float) -> list[Tensor]:
        """``F̆⁻¹ g`` per layer (plain gradient for unsupported parameters / layers without an
        inverse yet)."""
        names = list(self.params)
        kaisa = self.dist is not None and self.dist.mode == "kaisa"
        fn = self.dist.precondition if kaisa else self.engine.precondition
        pre = fn(dict(zip(names, grads, strict=True)), damping)
        return [pre.get(n, g) for n, g in zip(names, grads, strict=True)]

    # ---- step ----------------------------------------------------------------------------
    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        k = self.steps + 1
        due = self.engine.due_statistics(k - 1)
        cov = any(a or g for a, g in due.values())
        need_g = any(g for _, g in due.values())
        params = list(self.params.values())
        rng = rng_state([*params, *[t for t in (inputs, targets) if isinstance(t, Tensor)]]) \
            if self.adaptive else None
        try:
            loss, _, grads, passes = self._forward_backward(inputs, targets, cov, need_g)
        except SkipStep:
            if self.dist is not None:  # every rank skips together
                self.dist.agree(False)
                self.dist.end_step()
            raise
        if self.dist is not None and not self.dist.agree(True):
            self.dist.end_step()
            raise SkipStep("loss or gradient on another rank", loss)
        stats = self._statistics(batch_size_of(inputs), passes, due) if cov else None
        self.capture.clear()
        weights = [p.detach() for p in params]
        if any(self.group_values("weight_decay")):
            grads = [g + wd * w if wd else g for g, w, wd in
                     zip(grads, weights, self.group_values("weight_decay"), strict=True)]

        # -- all checks passed: from here on state changes --------------------------------
        if self.dist is not None:
            return self._distributed_step(loss, grads, stats, k)
        if stats is not None:
            self.engine.update(stats, k - 1)
            self.counters["factor_updates"] += 1
        if self.engine.refresh_due(k - 1):
            self.counters["inverse_updates"] += 1
        if self.ekfac and stats is not None:
            self.engine.update_scalings(stats)

        if self.adaptive:
            update = self._adaptive_update(inputs, targets, loss, grads, weights, rng, k)
        else:
            update = self._plain_update(grads)
        with torch.no_grad():
            for p, d in zip(params, update):
                p.add_(d)
        return loss

    def _plain_update(self, grads: list[Tensor]) -> list[Tensor]:
        p = self._precondition(grads, self.damping)
        lrs = self.group_values("lr")
        if self.kl_clip is not None:
            if len(set(lrs)) == 1:
                vg = abs(float(dot64(p, grads))) * lrs[0]**2
            else:
                vg = abs(sum(lr**2 * float(dot64([a], [b]))
                             for lr, a, b in zip(lrs, p, grads, strict=True)))
            nu = min(1.0, math.sqrt(self.kl_clip / vg)) if vg > 0 else 1.0
            p = [nu * t for t in p]
            self.diagnostics["kl_nu"] = nu
        moms = self.group_values("momentum")
        if any(moms):
            bufs = [m * b + t if m else t for m, b, t in
                    zip(moms, self.momentum_buffers, p, strict=True)]
            self._set_momentum_buffers(bufs)
            p = bufs
        return [-lr * t for lr, t in zip(lrs, p, strict=True)]

    # ---- state ---------------------------------------------------------------------------
    # ---- distributed K-FAC (curvlab.kfac.distributed) -----------------------------------
    def _distributed_step(self, loss: Tensor, grads: list[Tensor], stats, k: int) -> Tensor:
        """KAISA: averaged gradients and factors on every rank, replicated update; SP-NGD:
        owners update their parameters, one all-gather of the weights."""
        d, names, params = self.dist, list(self.params), list(self.params.values())
        stats, avg = d.reduce(stats, dict(zip(names, grads, strict=True)))
        if stats is not None and not stats.is_finite():
            warnings.warn(f"{type(self).__name__}: non-finite curvature statistics; factors not "
                          "updated this step", RuntimeWarning, stacklevel=3)
            stats = LayerStatistics()  # empty: SP-NGD's policy sync still runs on every rank
        if stats is not None:
            d.update(stats, k - 1)
            self.counters["factor_updates"] += int(bool(stats.A or stats.G
                                                        or getattr(stats, "F", None)))
        if d.refresh(k - 1):
            self.counters["inverse_updates"] += 1
        full = [avg[n] if n in avg else torch.zeros_like(p) for n, p in zip(names, params)]
        update = self._plain_update(full)
        mine = set(names) if d.mode == "kaisa" else set(d.owned_params())
        with torch.no_grad():
            for n, p, u in zip(names, params, update, strict=True):
                if n in mine:
                    p.add_(u)
            if d.mode == "sp-ngd":
                for n, w in d.gather({n: self.params[n].detach() for n in mine}).items():
                    self.params[n].copy_(w)
        d.end_step()
        return loss

    @property
    def assignment(self):
        """Distributed K-FAC's layer assignment (``None`` when not distributed)."""
        return None if self.dist is None else self.dist.assignment

    def comm_stats(self) -> dict[str, Any]:
        """Bytes and calls per collective per step (:mod:`curvlab.kfac.distributed`)."""
        if self.dist is None:
            raise RuntimeError(f"{type(self).__name__}.comm_stats: not running distributed")
        return self.dist.comm_stats()

    def state_dict(self) -> dict[str, Any]:
        """As the base class; distributed: a collective (every rank returns the full state)."""
        if self.dist is not None:
            self.dist.sync_param_state(self.state)
        return super().state_dict()

    def _extra_state(self) -> dict[str, Any]:
        engine = self.engine.state_dict() if self.dist is None else self.dist.engine_state()
        return {"engine": engine, "gamma": self.gamma,
                "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self.dist is not None:
            self.dist.load_engine_state(state["engine"])
        else:
            self.engine.load_state_dict(state["engine"])
        self.gamma = float(state["gamma"])
        self.generator.set_state(state["generator"])

    # ---- deprecated names ----------------------------------------------------------------
    @property
    def lambd(self) -> float:
        """Deprecated: the damping λ, now ``param_groups[...]['damping']``."""
        warnings.warn("KFACOptimizer.lambd is deprecated, use .damping (param_groups)",
                      DeprecationWarning, stacklevel=2)
        return self.damping


def __getattr__(name: str):
    if name == "KFAC":
        warnings.warn("curvlab.optim.kfac.KFAC is deprecated, use KFACOptimizer",
                      DeprecationWarning, stacklevel=2)
        return KFACOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
