r"""K-FAC as a gradient preconditioner for ordinary PyTorch training loops (KAISA-style).

Usage contract (as in gpauloski/kfac-pytorch)::

    precond = KFACPreconditioner(model, loss_fn, damping=1e-3)   # fisher='empirical'
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        precond.step()          # replaces each registered parameter's .grad by F̆⁻¹ .grad
        optimizer.step()        # any torch optimizer (SGD with momentum, weight decay, ...)

Statistics are captured by hooks during the user's own forward and backward, only on covariance
steps (every ``cov_interval`` calls of :meth:`step`, counted from 0) and only while the model
is in training mode with gradients enabled: a forward pre-hook on the model opens a
:class:`curvlab.kfac.FactorCapture` for the duration of the forward, whose tensor hooks record
the output derivatives of the following backward.

Fisher. ``'empirical'`` (default): the derivatives of the user's loss; the factor convention of
:mod:`curvlab.kfac.factors` rescales ``G`` by ``N`` for a ``'mean'`` loss (``loss_reduction``,
taken from ``loss_fn`` when given). ``'mc'`` (true Fisher, needs ``loss_fn``): after the
forward call ``precond.sample_backward(output)``; it back-propagates ``mc_samples`` gradients at
targets sampled from the model to the layer outputs (``.grad`` is not touched, the graph is
retained for the user's ``loss.backward()``, before or after which it may be called).

``step()`` uses the same Kronecker engine (:class:`curvlab.kfac.KroneckerEngine`) as the
:class:`curvlab.KFAC` operator and :class:`curvlab.optim.KFACOptimizer` (EMA with warm start,
guarded eigendecompositions every ``inv_interval`` steps and on the first three, ``inverse=
'eigen' | 'factored'``, EKFAC scalings updated on every covariance step, grouped convolutions
one block per group, shared weights by K-FAC-expand). Parameters of unsupported modules keep their
gradient (warning; ``strict=True`` raises). KL clip (spec §7, KAISA): with ``kl_clip`` and the
optimizer's learning rate ``lr`` (a number or a zero-argument callable),
``ν = min(1, sqrt(kl_clip / |Σ lr²⟨p, g⟩|))`` over the preconditioned layers, which are scaled by
``ν``. Non-finite gradients: ``.grad`` and the state are left untouched, with a warning.
Gradient accumulation over several backward passes per step is not supported (statistics of
all passes would be pooled as one batch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import loss_rule
from curvlab.func.params import ParamsArg, select_params
from curvlab.kfac import FactorCapture, KFACLayer, KroneckerEngine, register_layers
from curvlab.kfac.capture import group_passes
from curvlab.kfac.distributed import DistributedKFAC, run_step, wants_distributed
from curvlab.kfac.refresh import FixedRefresh, RefreshPolicy
from curvlab.optim._common import check_hyper, check_int, dot64, is_finite

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner:
    r"""Rewrite ``.grad`` with the K-FAC preconditioned gradient (see the module docstring).

    Args:
        model: The network.
        loss_fn: The training loss (needed for ``fisher='mc'``; gives the reduction).
        damping: ``λ`` of the preconditioner (Tikhonov on the product for ``'eigen'``).
        fisher: ``'empirical'`` or ``'mc'``.
        ema_decay, cov_interval, inv_interval, inverse, ekfac: As in
            :class:`curvlab.optim.KFACOptimizer`.
        kl_clip: KL clip ``c`` (needs ``lr``); ``None`` disables it.
        lr: Learning rate of the wrapped optimizer, number or callable (for the KL clip).
        loss_reduction: ``'mean'`` or ``'sum'`` when ``loss_fn`` is not given.
        mc_samples, generator: Monte-Carlo sampling for ``fisher='mc'``.
        params: Parameter selection (default all trainable).
        strict: Raise for selected parameters of unsupported modules.
        refresh: A refresh policy (:mod:`curvlab.kfac.refresh`), as for
            :class:`curvlab.optim.KFACOptimizer`; default ``FixedRefresh(cov_interval,
            inv_interval, num_forced_inverses)``.
        split_dim: THOR's block splitting (:mod:`curvlab.kfac.split`); ``None``: none.
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
        engine: The :class:`~curvlab.kfac.KroneckerEngine`.
        steps: Number of :meth:`step` calls that preconditioned gradients.
        counters: ``steps``, ``skipped_steps``, ``factor_updates``, ``inverse_updates``,
            ``backward`` (extra sampled passes).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> precond = KFACPreconditioner(net, loss_fn, damping=0.1)
        >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> first = None
        >>> for _ in range(10):
        ...     sgd.zero_grad()
        ...     loss = loss_fn(net(x), y)
        ...     loss.backward()
        ...     precond.step()
        ...     sgd.step()
        ...     first = loss.item() if first is None else first
        >>> loss.item() < first
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        damping: float,
        fisher: str = "empirical",
        ema_decay: float = 0.95,
        cov_interval: int = 1,
        inv_interval: int = 20,
        inverse: str = "eigen",
        ekfac: bool = False,
        kl_clip: float | None = None,
        lr: float | Callable[[], float] | None = None,
        loss_reduction: str | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        params: ParamsArg = None,
        strict: bool = False,
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
        self.model = model
        self.params = select_params(model, params)
        self.damping = check_hyper("damping", damping, minimum=0.0)
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        self.fisher = fisher
        self.rule = None if loss_fn is None else loss_rule(loss_fn)
        if fisher == "mc" and self.rule is None:
            raise ValueError("fisher='mc' needs loss_fn (its likelihood gives the sampled targets)")
        if loss_reduction is None:
            loss_reduction = self.rule.reduction if self.rule is not None else "mean"
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        ema = check_hyper("ema_decay", ema_decay, minimum=0.0)
        if ema >= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.cov_interval = check_int("cov_interval", cov_interval)
        self.inv_interval = check_int("inv_interval", inv_interval)
        self.mc_samples = check_int("mc_samples", mc_samples)
        self.num_forced_inverses = check_int("num_forced_inverses", num_forced_inverses, 0)
        self.kl_clip = check_hyper("kl_clip", kl_clip, minimum=0.0, strict=True, allow_none=True)
        if self.kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs lr= (the wrapped optimizer's learning rate)")
        self.lr = lr
        table = register_layers(model, self.params, strict=strict, who="KFACPreconditioner",
                                fallback="these parameters keep their plain gradient "
                                "(identity preconditioner)",
                                unitwise=unitwise)
        self.layers: list[KFACLayer] = list(table.layers)
        self.unsupported = [n for ps in table.unsupported.values() for n in ps]
        self.engine = KroneckerEngine(
            table, fisher=fisher, reduction=loss_reduction, mc_samples=self.mc_samples,
            inverse=inverse, ekfac=ekfac, ema_decay=ema,
            split_dim=split_dim, kfac_approx=kfac_approx, stats_fraction=stats_fraction,
            refresh=refresh if refresh is not None else FixedRefresh(
                self.cov_interval, self.inv_interval, self.num_forced_inverses))
        self.ekfac = bool(ekfac)
        self.norm_layers = list(table.norm)
        self.capture = FactorCapture([*self.layers, *self.norm_layers])
        self._mc_grads: dict[str, tuple[list[Tensor], list[int]]] = {
            la.name: ([], []) for la in self.capture.layers}
        first = next(iter(self.params.values()))
        if generator is None and fisher == "mc":
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=first.device).manual_seed(seed)
        self.generator = generator
        self.steps = 0
        self.counters = {"steps": 0, "skipped_steps": 0, "factor_updates": 0,
                         "inverse_updates": 0, "backward": 0}
        self._handles = [model.register_forward_pre_hook(self._pre_forward),
                         model.register_forward_hook(self._post_forward)]
        self._open = False
        # -- distributed K-FAC (curvlab.kfac.distributed) --
        self.dist: DistributedKFAC | None = None
        if wants_distributed(distributed, distributed_mode, grad_worker_fraction, process_group,
                             "KFACPreconditioner"):
            if self.kl_clip is not None and distributed_mode == "sp-ngd":
                raise ValueError("KFACPreconditioner: kl_clip is not supported with "
                                 "distributed_mode='sp-ngd'")
            self.dist = DistributedKFAC(
                self.engine, self.params, mode=distributed_mode or "kaisa",
                grad_worker_fraction=grad_worker_fraction, group=process_group,
                who="KFACPreconditioner", **(distributed_options or {}))

    # ---- hooks -----------------------------------------------------------------------------
    def _cov_step(self) -> bool:
        return any(a or g for a, g in self.engine.due_statistics(self.steps).values())

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled() and self._cov_step() and not self._open:
            self.capture.__enter__()
            self._open = True

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._open:
            self.capture.__exit__(None, None, None)
            self._open = False

    def remove(self) -> None:
        """Remove all hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.capture.remove()

    # ---- Monte-Carlo passes ----------------------------------------------------------------
    def sample_backward(self, output: Tensor, targets: Tensor | None = None) -> None:
        """Back-propagate sampled-target gradients of ``output`` (for ``fisher='mc'``).

        Call after the forward that produced ``output`` on a covariance step (a no-op on other
        steps); ``.grad`` is not modified and the graph is retained. Pass ``targets`` when the
        loss ignores some positions (cross-entropy ``ignore_index``): no sample is drawn there.
        """
        if self.fisher != "mc":
            raise RuntimeError("sample_backward is only used with fisher='mc'")
        if not any(self.capture.inputs[layer.name] for layer in self.layers):
            return  # not a covariance step (nothing captured)
        before = {n: len(g) for n, g in self.capture.output_grads.items()}
        vectors = self.rule.sample_grads(output.detach(), self.mc_samples, self.generator,
                                         target=targets)
        weights = self.capture.backward_targets()
        for vec in vectors:
            torch.autograd.grad(output, weights, vec.to(output.dtype), retain_graph=True,
                                allow_unused=True)
            self.counters["backward"] += 1
        for name, gs in self.capture.output_grads.items():
            calls = self.capture.grad_calls[name]
            self._mc_grads[name][0].extend(gs[before[name]:])
            self._mc_grads[name][1].extend(calls[before[name]:])
            del gs[before[name]:]
            del calls[before[name]:]

    # ---- step -------------------------------------------------------------------------------
    def _current_lr(self) -> float:
        return float(self.lr() if callable(self.lr) else self.lr)

    def step(self) -> None:
        """Update factors (on covariance steps), inverses (when due) and rewrite ``.grad``."""
        names = list(self.params)
        grads = [p.grad for p in self.params.values()]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise RuntimeError("KFACPreconditioner.step: no parameter has a .grad; call "
                               "loss.backward() first")
        finite = is_finite(*[grads[i] for i in present])
        if self.dist is not None:
            finite = self.dist.agree(finite)  # every rank skips together
        if not finite:
            if self.dist is not None:
                self.dist.end_step()
            self.counters["skipped_steps"] += 1
            warnings.warn("KFACPreconditioner: non-finite gradients; .grad and the K-FAC state "
                          f"are left unchanged (skipped steps so far: "
                          f"{self.counters['skipped_steps']})", RuntimeWarning, stacklevel=2)
            self._clear()
            return
        step = self.steps
        stats = self._statistics() if self._cov_step() else None
        self._clear()
        filled = {n: g if g is not None else torch.zeros_like(p)
                  for n, g, p in zip(names, grads, self.params.values(), strict=True)}
        if self.dist is not None:  # -- distributed K-FAC (curvlab.kfac.distributed) --
            new, _, updated, refreshed = run_step(self.dist, step, stats, filled, self.damping)
            self.counters["factor_updates"] += int(updated)
            self.counters["inverse_updates"] += int(bool(refreshed))
            self.dist.end_step()
        else:
            if stats is not None:
                self.engine.update(stats, step)
                self.counters["factor_updates"] += 1
            if self.engine.refresh_due(step):
                self.counters["inverse_updates"] += 1
            if self.ekfac and stats is not None:
                self.engine.update_scalings(stats)
            new = self.engine.precondition(filled, self.damping)
        done = [i for i, n in enumerate(names) if n in new and grads[i] is not None]
        if self.kl_clip is not None and done:
            lr = self._current_lr()
            vg = abs(float(dot64([new[names[i]] for i in done],
                                 [filled[names[i]] for i in done]))) * lr**2
            nu = min(1.0, math.sqrt(self.kl_clip / vg)) if vg > 0 else 1.0
            new = {n: t * nu for n, t in new.items()}
        with torch.no_grad():
            for i in done:
                grads[i].copy_(new[names[i]])
        self.steps += 1
        self.counters["steps"] += 1

    def _clear(self) -> None:
        self.capture.clear()
        for gs, cs in self._mc_grads.values():
            gs.clear()
            cs.clear()

    def _statistics(self):
        mc = None
        if self.fisher == "mc":
            mc = {la.name: group_passes(la.name, *self._mc_grads[la.name],
                                        max(1, self.capture.calls(la.name)))
                  for la in self.capture.layers if self.capture.inputs[la.name]}
            if any(self.capture.inputs[la.name] for la in self.capture.layers) \
                    and not any(mc.values()):
                raise RuntimeError(
                    "KFACPreconditioner(fisher='mc'): no sampled passes on a covariance "
                    "step; call precond.sample_backward(output) after the forward")
        num = next((self.capture.layer_inputs(la.name).shape[0] for la in self.capture.layers
                    if self.capture.inputs[la.name]), 0)
        stats = self.engine.statistics(self.capture, num, grads=mc,
                                       due=self.engine.due_statistics(self.steps))
        if not (stats.A or stats.F):
            return None
        if self.dist is None and not stats.is_finite():  # distributed: checked after reduce
            warnings.warn("KFACPreconditioner: non-finite curvature statistics; factors not "
                          "updated this step", RuntimeWarning, stacklevel=3)
            return None
        return stats

    # ---- state ------------------------------------------------------------------------------
    @property
    def assignment(self):
        """Distributed K-FAC's layer assignment (``None`` when not distributed)."""
        return None if self.dist is None else self.dist.assignment

    def comm_stats(self) -> dict[str, Any]:
        """Bytes and calls per collective per step (:mod:`curvlab.kfac.distributed`)."""
        if self.dist is None:
            raise RuntimeError("KFACPreconditioner.comm_stats: not running distributed")
        return self.dist.comm_stats()

    def memory_usage(self) -> dict[str, int]:
        """Bytes of the factors, of the inverses, and their total."""
        return self.engine.memory_bytes()

    def state_dict(self) -> dict[str, Any]:
        """Engine state (factors, eigendecompositions, scalings), step count, counters,
        generator state."""
        engine = self.engine.state_dict() if self.dist is None else self.dist.engine_state()
        return {"engine": engine, "steps": self.steps,
                "counters": dict(self.counters),
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        if self.dist is not None:
            self.dist.load_engine_state(state["engine"])
        else:
            self.engine.load_state_dict(state["engine"])
        self.steps = int(state["steps"])
        self.counters = dict(state["counters"])
        if state["generator"] is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
