r"""K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) as a curvlab
optimizer with the ``loss = opt.step(inputs, targets)`` interface.

Curvature. Per supported layer (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``) the block of
the Fisher/GGN is approximated by ``G ⊗ A`` in curvlab's flat order inside the gradient matrix
``V = [∇W | ∇b]`` (see :mod:`curvlab.optim._kfac_core` for the exact factor scaling: per-example
expectations, so that ``A ⊗ G`` equals the GGN block of a mean/sum-reduced loss where the
factorization is exact). ``fisher``:

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

from curvlab.func.linearize import linearize
from curvlab.func.losses import loss_rule
from curvlab.func.params import ParamsArg, batch_size_of, cloned_buffers, select_params
from curvlab.kfac import (
    FactorCapture,
    KFACLayer,
    cross_input_factor,
    cross_output_factor,
    fisher_scale,
)
from curvlab.optim._common import (
    check_hyper,
    dot64,
    is_finite,
    new_counters,
    replay_rng,
    restore_buffers,
    rng_state,
    snapshot_buffers,
    warn_skip,
)
from curvlab.optim._kfac_core import (
    KFACCurvature,
    find_kfac_layers,
    layer_factors,
    precondition_grads,
)

__all__ = ["KFAC"]

_FISHERS = ("mc", "type2", "empirical")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _autocast_off(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class KFAC:
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
        params: Parameter selection (default all trainable).
        strict: Raise instead of warning when selected parameters belong to unsupported modules.
        initial_gamma: Initial γ (adaptive; default ``sqrt(damping + weight_decay)``).
        lambda_interval, gamma_interval: ``T1`` and ``T2`` (adaptive; 5 and 20).
        num_forced_inverses: Steps at the start on which inverses are always refreshed (3).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = KFAC(net, torch.nn.CrossEntropyLoss(), lr=0.1, damping=0.1)
        >>> losses = [opt.step(x, y).item() for _ in range(10)]
        >>> losses[-1] < losses[0]
        True
    """

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
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.rule = loss_rule(loss_fn)
        self.params = select_params(model, params)
        self.lr = check_hyper("lr", lr, minimum=0.0, strict=True)
        self.momentum = check_hyper("momentum", momentum, minimum=0.0)
        self.damping = check_hyper("damping", damping, minimum=0.0)
        self.weight_decay = check_hyper("weight_decay", weight_decay, minimum=0.0)
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}")
        self.fisher = fisher
        self.ema_decay = check_hyper("ema_decay", ema_decay, minimum=0.0)
        if self.ema_decay >= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.cov_interval = _check_int("cov_interval", cov_interval)
        self.inv_interval = _check_int("inv_interval", inv_interval)
        self.kl_clip = check_hyper("kl_clip", kl_clip, minimum=0.0, strict=True, allow_none=True)
        self.adaptive = bool(adaptive)
        if structure not in ("block-diagonal", "block-tridiagonal"):
            raise ValueError(f"structure must be 'block-diagonal' or 'block-tridiagonal', got "
                             f"{structure!r}")
        self.structure = structure
        self.mc_samples = _check_int("mc_samples", mc_samples)
        self.lambda_interval = _check_int("lambda_interval", lambda_interval)
        self.gamma_interval = _check_int("gamma_interval", gamma_interval)
        self.num_forced_inverses = _check_int("num_forced_inverses", num_forced_inverses, 0)
        layers, unsupported = find_kfac_layers(model, self.params, strict=strict, who="KFAC")
        self.layers: list[KFACLayer] = layers
        self.unsupported: list[str] = unsupported
        self.curv = KFACCurvature(layers, ema_decay=self.ema_decay, inverse=inverse, ekfac=ekfac)
        if structure == "block-tridiagonal":
            bad = [layer.name for layer in layers if layer.kind != "linear"]
            if bad or ekfac:
                raise ValueError(
                    "structure='block-tridiagonal' needs a chain of nn.Linear layers and "
                    f"ekfac=False; got conv layers {bad}" if bad else
                    "structure='block-tridiagonal' cannot be combined with ekfac=True"
                )
            self.curv.tridiagonal = True
        self.inverse = inverse
        self.ekfac = bool(ekfac)
        self.capture = FactorCapture(layers)
        first = next(iter(self.params.values()))
        self.device = first.device
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator
        # adaptive state
        self.lambd = self.damping
        gmin = math.sqrt(self.weight_decay)
        self.gamma_bounds = (gmin, 1.0)
        if initial_gamma is None:
            initial_gamma = math.sqrt(self.lambd + self.weight_decay)
        self.gamma = check_hyper("initial_gamma", initial_gamma, minimum=0.0)
        self.gamma = min(max(self.gamma, gmin), 1.0)
        self.buf = [torch.zeros_like(p) for p in self.params.values()]  # momentum / δ₀
        self.count = 0
        self.counters = new_counters()
        self.counters.update(factor_updates=0, inverse_updates=0)
        self.last: dict[str, float | None] = {}

    # ---------------------------------------------------------------------------------------
    def memory_usage(self) -> dict[str, int]:
        """Bytes held by the Kronecker factors, by the inverses (eigendecompositions and EKFAC
        scalings), and their total."""
        return self.curv.memory_bytes()

    def _precon_damping(self) -> float:
        return self.gamma**2 if self.adaptive else self.damping

    # ---------------------------------------------------------------------------------------
    def _forward_backward(self, inputs: Any, targets: Tensor, cov: bool):
        """Training forward (capturing layer inputs and, through tensor hooks, output
        derivatives on covariance steps), loss, gradients and the extra Fisher backward passes.
        Returns ``(loss, output, grads, passes)`` or ``(what, loss)`` when non-finite;
        ``passes`` is the number of extra backward passes recorded after the loss backward."""
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
            raise TypeError(f"KFAC: the model must return a single tensor, got {type(out)}")
        self.rule.check(out, targets)
        loss = self.loss_fn(out, targets)
        if not bool(torch.isfinite(loss.detach())):
            return "loss", loss.detach()
        extra = cov and self.fisher != "empirical"
        res = torch.autograd.grad(loss, params, retain_graph=extra, allow_unused=True)
        self.counters["backward"] += 1
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(res, params)]
        if not is_finite(*grads):
            return "gradient", loss.detach()
        passes = 0
        if extra:
            if self.fisher == "mc":
                vectors = self.rule.sample_grads(out.detach(), self.mc_samples, self.generator)
            else:
                vectors = self.rule.sqrt_hessian(out.detach(), targets)
            weights = [layer.weight_param for layer in self.layers]
            for j, vec in enumerate(vectors):
                torch.autograd.grad(out, weights, vec.to(out.dtype),
                                    retain_graph=j < len(vectors) - 1, allow_unused=True)
                self.counters["backward"] += 1
            passes = len(vectors)
        return loss.detach(), out.detach(), grads, passes

    def _statistics(self, num_examples: int, passes: int):
        """New A, G of every layer that received statistics (``None`` if non-finite) and the
        per-layer pass lists used (for EKFAC)."""
        new_A, new_G, used = {}, {}, {}
        with _autocast_off(self.device):
            for layer in self.layers:
                xs = self.capture.inputs[layer.name]
                gs = self.capture.output_grads[layer.name]
                if not xs or not gs:
                    continue
                gs = gs[:1] if self.fisher == "empirical" else gs[-passes:] if passes else []
                if not gs:
                    continue
                dtype = torch.float64 if self.params[layer.weight].dtype == torch.float64 \
                    else torch.float32
                A, G = layer_factors(layer, xs, gs, num_examples=num_examples,
                                     fisher=self.fisher, reduction=self.rule.reduction,
                                     mc_samples=self.mc_samples, dtype=dtype)
                new_A[layer.name], new_G[layer.name] = A, G
                used[layer.name] = (list(xs), list(gs))
        cross = {}
        if self.structure == "block-tridiagonal" and len(new_A) == len(self.layers):
            with _autocast_off(self.device):
                cross = self._cross_statistics(used, num_examples)
        if not is_finite(*new_A.values(), *new_G.values(), *[t for c in cross.values()
                                                                 for t in c]):
            return None
        return new_A, new_G, used, cross

    def _cross_statistics(self, used, num_examples: int) -> dict[int, tuple[Tensor, Tensor]]:
        out = {}
        for i in range(len(self.layers) - 1):
            a, b = self.layers[i], self.layers[i + 1]
            (xa, ga), (xb, gb) = used[a.name], used[b.name]
            if len(xa) != 1 or len(xb) != 1 or xa[0].shape[1] != 1 or xb[0].shape[1] != 1 \
                    or len(ga) != len(gb):
                raise ValueError(
                    f"structure='block-tridiagonal': layers {a.name!r} and {b.name!r} must be "
                    "called once per forward on (N, features) inputs"
                )
            dtype = self.curv.A[a.name].dtype if a.name in self.curv.A else torch.float32
            dtype = torch.float64 if self.params[a.weight].dtype == torch.float64 else dtype
            ca = cross_input_factor(a, b, xa[0].to(dtype), xb[0].to(dtype))
            cg = cross_output_factor(a, b, [g.to(dtype) for g in ga], [g.to(dtype) for g in gb],
                                     num_examples, fisher=self.fisher,
                                     reduction=self.rule.reduction, mc_samples=self.mc_samples)
            out[i] = (ca, cg)
        return out

    # ---------------------------------------------------------------------------------------
    def _precondition(self, grads: Sequence[Tensor], damping: float) -> list[Tensor]:
        """``F̆⁻¹ g`` per layer (plain gradient for unsupported parameters / layers without an
        inverse yet)."""
        if self.structure == "block-tridiagonal":
            index = {n: i for i, n in enumerate(self.params)}
            vs = [layer.to_matrix(grads[index[layer.weight]],
                                  None if layer.bias is None else grads[index[layer.bias]])
                  for layer in self.layers]
            with _autocast_off(self.device):
                us = self.curv.tridiagonal_apply(vs, damping)
            if us is not None:
                out = list(grads)
                for layer, u in zip(self.layers, us):
                    w, b = layer.from_matrix(u)
                    out[index[layer.weight]] = w
                    if layer.bias is not None:
                        out[index[layer.bias]] = b
                return out
        return precondition_grads(self.curv, list(self.params), grads, damping)[0]

    # ---------------------------------------------------------------------------------------
    def step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One K-FAC iteration on the mini-batch; returns the loss before the update."""
        k = self.count + 1
        cov = (k - 1) % self.cov_interval == 0
        inv_due = (k - 1) % self.inv_interval == 0 or k <= self.num_forced_inverses
        params = list(self.params.values())
        buffers = snapshot_buffers(self.model)
        gen_state = self.generator.get_state()
        rng = rng_state([*params, *[t for t in (inputs, targets) if isinstance(t, Tensor)]])
        res = self._forward_backward(inputs, targets, cov)
        if isinstance(res[0], str):
            self.capture.clear()
            return self._skip(buffers, gen_state, *res)
        loss, out, grads, passes = res
        num_examples = batch_size_of(inputs)
        stats = None
        if cov:
            stats = self._statistics(num_examples, passes)
            missing = [layer.name for layer in self.layers
                       if stats is not None and layer.name not in stats[0]]
            if missing:
                warnings.warn(f"KFAC: layers {missing} received no statistics (module not called "
                              "through its forward, or output not reaching the loss); they keep "
                              "their old factors or the plain gradient", RuntimeWarning,
                              stacklevel=2)
            if stats is None:
                warnings.warn("KFAC: non-finite curvature statistics; factors not updated this "
                              "step", RuntimeWarning, stacklevel=2)
        self.capture.clear()

        weights = [p.detach() for p in params]
        if self.weight_decay:
            grads = [g + self.weight_decay * w for g, w in zip(grads, weights)]

        # -- all checks passed: from here on state changes ------------------------------------
        if stats is not None:
            self.curv.update(stats[0], stats[1], stats[3])
            self.counters["factor_updates"] += 1
        if inv_due and (self.curv.dirty or not self.curv.eig):
            self.curv.refresh(self._precon_damping())
            self.counters["inverse_updates"] += 1
        if self.ekfac and stats is not None:
            self._update_ekfac(stats[2])

        if self.adaptive:
            update = self._adaptive_update(inputs, targets, out, loss, grads, weights, rng, k)
        else:
            update = self._plain_update(grads)
        with torch.no_grad():
            for p, d in zip(params, update):
                p.add_(d)
        self.count += 1
        self.counters["steps"] += 1
        return loss

    def _update_ekfac(self, used: dict[str, tuple[list[Tensor], list[Tensor]]]) -> None:
        by_layer = {layer.name: layer for layer in self.layers}
        n = None
        new = {}
        with _autocast_off(self.device):
            for name, (xs, gs) in used.items():
                n = sum(x.shape[0] for x in xs)
                weight = fisher_scale(self.fisher, n, self.rule.reduction, self.mc_samples)
                total = None
                for g in gs:
                    s = self.curv.ekfac_scale(by_layer[name], xs, g, weight)
                    if s is None:
                        break
                    total = s if total is None else total + s
                if total is not None:
                    new[name] = total
        if new:
            self.curv.update_scale(new)

    def _plain_update(self, grads: list[Tensor]) -> list[Tensor]:
        p = self._precondition(grads, self.damping)
        if self.kl_clip is not None:
            vg = abs(float(dot64(p, grads))) * self.lr**2
            nu = min(1.0, math.sqrt(self.kl_clip / vg)) if vg > 0 else 1.0
            p = [nu * t for t in p]
            self.last["kl_nu"] = nu
        if self.momentum:
            self.buf = [self.momentum * b + t for b, t in zip(self.buf, p)]
            p = self.buf
        return [-self.lr * t for t in p]

    # ---- adaptive -------------------------------------------------------------------------
    def _qmodel(self, lin, out, targets, grads, delta, w, hw, d0_zero, lam):
        """Optimal (α, μ), the model change M(δ)−M(0) and δ for proposal ``delta``."""
        u = lin.jvp(delta)
        self.counters["jvp"] += 1
        self.counters["ggn_products"] += 1
        hu = self.rule.hessian_vp(out, targets, u)
        damp = lam + self.weight_decay
        m11 = float(torch.sum(u * hu, dtype=torch.float64) + damp * dot64(delta, delta))
        c1 = float(dot64(grads, delta))
        if d0_zero:
            M = torch.tensor([[m11]], dtype=torch.float64)
            c = torch.tensor([c1], dtype=torch.float64)
        else:
            m12 = float(torch.sum(u * hw, dtype=torch.float64) + damp * dot64(delta, self.buf))
            m22 = float(torch.sum(w * hw, dtype=torch.float64) + damp * dot64(self.buf, self.buf))
            c2 = float(dot64(grads, self.buf))
            M = torch.tensor([[m11, m12], [m12, m22]], dtype=torch.float64)
            c = torch.tensor([c1, c2], dtype=torch.float64)
        sol = -(torch.linalg.pinv(M) @ c)
        change = 0.5 * float(sol @ c)
        alpha = float(sol[0])
        mu = 0.0 if d0_zero else float(sol[1])
        return alpha, mu, change

    def _adaptive_update(self, inputs, targets, out, loss, grads, weights, rng, k):
        with replay_rng(rng):
            lin = linearize(self.model, self.params, inputs, update_buffers=False)
        self.counters["forward"] += 1
        lout = lin.output.detach()
        d0_zero = all(not bool(b.any()) for b in self.buf)
        if d0_zero:
            w = hw = None
        else:
            w = lin.jvp(self.buf)
            self.counters["jvp"] += 1
            hw = self.rule.hessian_vp(lout, targets, w)
        lam = self.lambd

        def candidate(gamma: float):
            delta = [-t for t in self._precondition(grads, gamma**2)]
            alpha, mu, change = self._qmodel(lin, lout, targets, grads, delta, w, hw,
                                             d0_zero, lam)
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
        step = [alpha * d + mu * b for d, b in zip(delta, self.buf)]
        rho = None
        if k % self.lambda_interval == 0:
            h_old = float(loss.to(torch.float64))
            if self.weight_decay:
                h_old += 0.5 * self.weight_decay * float(dot64(weights, weights))
            new_params = {n: w + s for (n, w), s in zip(
                ((n, p.detach()) for n, p in self.params.items()), step)}
            with torch.no_grad(), replay_rng(rng):
                new_out = torch.func.functional_call(
                    self.model, (new_params, cloned_buffers(self.model)), (inputs,))
            self.counters["forward"] += 1
            h_new = float(self.loss_fn(new_out, targets).to(torch.float64))
            if self.weight_decay:
                h_new += 0.5 * self.weight_decay * float(dot64(new_params.values(),
                                                                new_params.values()))
            rho = (h_new - h_old) / change if change != 0.0 else math.nan
            self.lambd = self.adjust_lambda(self.lambd, rho, self.lambda_interval)
        self.buf = [s.clone() for s in step]
        #: The proposal Δ of the last adaptive step (diagnostics, tests).
        self.last_proposal = delta
        self.last = {"alpha": alpha, "mu": mu, "qmodel_change": change, "rho": rho,
                     "lambda": self.lambd, "gamma": self.gamma}
        return step

    @staticmethod
    def adjust_lambda(lambd: float, rho: float | None, interval: int = 5) -> float:
        """Levenberg–Marquardt rule: ``ρ < 1/4`` or NaN ⇒ ``λ/ω₁``; ``ρ > 3/4`` ⇒ ``λω₁``;
        ``ω₁ = (19/20)^interval``.

        Example:
            >>> KFAC.adjust_lambda(1.0, 0.1) > 1.0, KFAC.adjust_lambda(1.0, 0.9) < 1.0
            (True, True)
        """
        omega1 = (19 / 20) ** interval
        if rho is None or math.isnan(rho) or rho < 0.25:
            return lambd / omega1
        if rho > 0.75:
            return lambd * omega1
        return lambd

    # ---------------------------------------------------------------------------------------
    def _skip(self, buffers, gen_state, what: str, loss: Tensor) -> Tensor:
        restore_buffers(self.model, buffers)
        self.generator.set_state(gen_state)
        self.counters["skipped_steps"] += 1
        warn_skip("KFAC", what, self.counters["skipped_steps"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Factors, eigendecompositions, EKFAC scalings, momentum / previous step, λ, γ, step
        count, counters and the generator state (tensors cloned)."""
        return {
            "curvature": self.curv.state_dict(),
            "buf": [b.clone() for b in self.buf],
            "lambd": self.lambd,
            "gamma": self.gamma,
            "count": self.count,
            "counters": dict(self.counters),
            "generator": self.generator.get_state(),
            "param_names": list(self.params),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the parameters themselves are the model's)."""
        if state["param_names"] != list(self.params):
            raise ValueError(
                f"KFAC.load_state_dict: state is for parameters {state['param_names']}, this "
                f"optimizer has {list(self.params)}"
            )
        for b, p in zip(state["buf"], self.params.values()):
            if b.shape != p.shape:
                raise ValueError(f"KFAC.load_state_dict: buffer of shape {tuple(b.shape)} for "
                                 f"a parameter of shape {tuple(p.shape)}")
        self.curv.load_state_dict(state["curvature"])
        self.buf = [b.clone() for b in state["buf"]]
        self.lambd = float(state["lambd"])
        self.gamma = float(state["gamma"])
        self.count = int(state["count"])
        self.counters = dict(state["counters"])
        self.generator.set_state(state["generator"])
