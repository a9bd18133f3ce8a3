r"""Exact damped natural gradient with the dense mini-batch Fisher/GGN (small models only).

Each step builds the dense curvature of the batch loss ``L = loss_fn(model(x), y)`` (the loss's
own reduction, curvlab's flat parameter order):

* ``fisher='type2'`` (default): :math:`F = J^\top H_L J`, the GGN, equal to the Fisher of the
  model's predictive distribution for cross-entropy, MSE (Gaussian with variance 1/2) and
  BCE-with-logits;
* ``fisher='empirical'``: :math:`F = w \sum_n g_n g_n^\top` (``g_n`` the gradient of example
  ``n``'s own loss, ``w = 1/N`` for ``'mean'``, 1 for ``'sum'``),

from explicit Jacobian rows (``Linearization.vjp_batched`` over unit output cotangents in
chunks; BatchNorm's cross-example coupling is therefore exact) and takes
:math:`\theta \leftarrow \theta - \mathrm{lr}\, b`, :math:`b \leftarrow \mu b + (F + \lambda
I)^{-1}(g + \eta\theta)` solved by Cholesky (in ``solve_dtype``, float64 by default; a failed
factorization retries with 10× more damping, up to 3 times, then skips the step). The GGN,
gradient and Jacobian rows come from :class:`curvlab.operators.LocalGGN`. The old keyword
``curvature='ggn' | 'empirical'`` still works for one release (``DeprecationWarning``). Refuses
models with more than ``max_params`` selected parameters (``P² `` memory, ``P³`` time).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.losses import AutodiffLossRule, loss_rule
from curvlab.func.params import ParamsArg, select_params
from curvlab.kfac import FactorCapture, find_layers
from curvlab.operators.local import LocalGGN
from curvlab.optim._common import check_hyper, is_finite
from curvlab.optim._compat import deprecated_alias, renamed_kwargs
from curvlab.optim.base import CurvatureOptimizer, SkipStep

__all__ = ["NaturalGradient", "dense_curvature"]


def _per_example_path(model: nn.Module, selected: dict[str, Tensor]):
    """Layers for the per-example fast path, or ``None`` when it does not apply (a selected
    parameter outside Linear/Conv2d layers, or BatchNorm in training mode coupling examples)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           for m in model.modules()):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            table = find_layers(model, selected)
        except ValueError:
            return None
    if table.unsupported or any(la.kind not in ("linear", "conv2d") for la in table.layers):
        return None
    return list(table.layers)


def _per_example_matrix(layers, cap: FactorCapture, names: list[str], selected, pass_index: int
                        ) -> Tensor:
    """``(N, P)`` per-example parameter gradients of one recorded backward pass (flat order)."""
    parts: dict[str, Tensor] = {}
    for layer in layers:
        xs, gs = cap.inputs[layer.name], cap.output_grads[layer.name]
        if len(xs) != 1:
            raise RuntimeError(f"layer {layer.name!r} called {len(xs)} times in one forward")
        x, g = xs[0], gs[pass_index]
        if layer.bias is not None:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        d = torch.einsum("nto,nti->noi", g, x)  # (N, out, in[+1])
        w, b = layer.from_matrix(d)
        parts[layer.weight] = w.reshape(w.shape[0], -1)
        if layer.bias is not None:
            parts[layer.bias] = b
    return torch.cat([parts[n] for n in names], dim=1)


_OLD_CURVATURE = {"ggn": "type2", "empirical": "empirical"}
_FISHERS = ("type2", "empirical")


def _fisher_arg(who: str, fisher: str | None, deprecated: dict[str, Any]) -> str:
    old = "curvature" in deprecated
    fisher = renamed_kwargs(who, deprecated, {"curvature": "fisher"},
                            {"fisher": fisher}).get("fisher", fisher)
    if old:
        fisher = _OLD_CURVATURE.get(fisher, fisher)
    fisher = "type2" if fisher is None else fisher
    if fisher not in _FISHERS:
        raise ValueError(f"{who}: fisher must be 'type2' or 'empirical', got {fisher!r}")
    return fisher


def dense_curvature(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    params: ParamsArg = None,
    fisher: str | None = None,
    chunk_size: int = 256,
    **deprecated: Any,
) -> Tensor:
    r"""Dense ``P × P`` GGN (``fisher='type2'``) or empirical Fisher of the batch loss.

    Curvlab flat order; the loss's own reduction (see the module docstring). Buffers are not
    updated. ``curvature='ggn' | 'empirical'`` is the deprecated spelling.

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> F = dense_curvature(net, torch.nn.CrossEntropyLoss(), torch.randn(4, 2),
        ...                     torch.tensor([0, 1, 2, 0]))
        >>> F.shape, bool(torch.allclose(F, F.T))
        (torch.Size([9, 9]), True)
    """
    fisher = _fisher_arg("dense_curvature", fisher, deprecated)
    G = LocalGGN(model, loss_rule(loss_fn), select_params(model, params), inputs, targets)
    return _curvature_from(G, fisher, chunk_size)


def _curvature_from(G: LocalGGN, fisher: str, chunk: int) -> Tensor:
    if fisher == "type2":
        return G.to_dense(chunk_size=chunk)
    out, rule = G.output, G.rule
    jac = G.jacobian(chunk)  # (M, P)
    n = out.shape[0]
    g = rule.per_example_grads(out, G.targets).reshape(n, -1)  # (N, m/N)
    per = torch.einsum("nk,nkp->np", g, jac.reshape(n, -1, jac.shape[1]))
    w = 1.0 / n if rule.reduction == "mean" else 1.0
    return w * per.T @ per


class NaturalGradient(CurvatureOptimizer):
    r"""Exact damped natural-gradient descent on small models (dense ``F``, Cholesky solve).

    Args:
        model: The network (single-tensor output).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        lr: Step size.
        damping: ``λ`` added to the curvature.
        momentum: Heavy-ball momentum on the natural-gradient direction.
        weight_decay: ``η``: ℓ2 term ``(η/2)‖θ‖²`` (gradient ``ηθ``, curvature ``+ηI``).
        fisher: ``'type2'`` (the GGN = Fisher for the supported likelihood losses) or
            ``'empirical'`` (old keyword ``curvature='ggn' | 'empirical'``: deprecated).
        solve_dtype: dtype of the dense solve (float64 default).
        max_params: Refuse (``ValueError``) models with more selected parameters.
        params: Parameter selection (default all trainable).
        chunk_size: Jacobian rows per batched backward.
        per_example: Use the fast path when it applies: all selected parameters in
            ``nn.Linear``/``nn.Conv2d`` layers, no BatchNorm in training mode (examples do not
            interact) and a closed-form loss rule; per-example gradients of each square-root
            column of ``H_L`` come from the layer inputs and output derivatives (one backward per
            column). Otherwise explicit Jacobian rows (batched backward over unit cotangents).

    ``lr``, ``momentum``, ``damping`` and ``weight_decay`` live in ``param_groups`` (``lr`` and
    ``momentum`` may differ between groups); the heavy-ball buffer is
    ``state[p]["momentum_buffer"]``.

    Counters: ``forward``, ``backward`` (gradient + Jacobian chunks), ``steps``,
    ``skipped_steps``, ``jvp`` and ``ggn_products`` (0: dense).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = NaturalGradient(net, torch.nn.CrossEntropyLoss(), lr=0.5, damping=1e-2)
        >>> losses = [opt.step(x, y).item() for _ in range(5)]
        >>> losses[-1] < losses[0]
        True
    """

    global_hypers = ("damping", "weight_decay")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lr: float = 1.0,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher: str | None = None,
        solve_dtype: torch.dtype = torch.float64,
        max_params: int = 5000,
        params: ParamsArg = None,
        chunk_size: int = 256,
        per_example: bool = True,
        **deprecated: Any,
    ) -> None:
        fisher = _fisher_arg("NaturalGradient", fisher, deprecated)
        defaults = {
            "lr": check_hyper("lr", lr, minimum=0.0, strict=True),
            "damping": check_hyper("damping", damping, minimum=0.0),
            "momentum": check_hyper("momentum", momentum, minimum=0.0),
            "weight_decay": check_hyper("weight_decay", weight_decay, minimum=0.0),
        }
        super().__init__(model, loss_fn, params, defaults)
        self.rule = loss_rule(loss_fn)
        count = sum(p.numel() for p in self.params.values())
        if count > max_params:
            raise ValueError(
                f"NaturalGradient: the model has {count} selected parameters, above the cap "
                f"max_params={max_params} (dense P x P curvature and Cholesky solve); use "
                "curvlab.optim.KFACOptimizer, select fewer params=, or raise max_params"
            )
        self.num_params = count
        self.fisher = fisher
        if solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or float64, got {solve_dtype}")
        self.solve_dtype = solve_dtype
        self.chunk_size = int(chunk_size)
        self.per_example = bool(per_example)
        self._fast_layers = _per_example_path(model, self.params) if self.per_example else None

    def direction(self, inputs: Any, targets: Tensor, *, update_buffers: bool = False
                  ) -> tuple[Tensor, list[Tensor] | None]:
        """``(loss, (F + (λ+η)I)⁻¹ (g + ηθ))`` on the batch (``None`` if not finite)."""
        fast = self._fast_layers if (self.per_example and not isinstance(
            self.rule, AutodiffLossRule)) else None
        if fast is not None:
            res = self._fast_curvature(fast, inputs, targets)
        else:
            res = self._jacobian_curvature(inputs, targets, update_buffers)
        if res[1] is None:
            return res[0], None
        loss, grads, F = res
        g = torch.cat([t.reshape(-1) for t in grads]).to(self.solve_dtype)
        F = F.to(self.solve_dtype)
        if not bool(torch.isfinite(F).all()):
            return loss, None
        eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        lam = self.hyper("damping") + self.hyper("weight_decay")
        sol = None
        for attempt in range(4):
            L, info = torch.linalg.cholesky_ex(F + (lam * 10**attempt) * eye)
            if int(info) == 0:
                sol = torch.cholesky_solve(g[:, None], L)[:, 0]
                break
        if sol is None or not bool(torch.isfinite(sol).all()):
            return loss, None
        sizes = [p.numel() for p in self.params.values()]
        parts = torch.split(sol, sizes)
        return loss, [s.reshape(p.shape).to(p.dtype)
                      for s, p in zip(parts, self.params.values())]

    def _jacobian_curvature(self, inputs, targets, update_buffers):
        G = LocalGGN(self.model, self.rule, self.params, inputs, targets,
                     update_buffers=update_buffers)
        self.counters["forward"] += 1
        out = G.output
        loss = G.loss
        if not math.isfinite(float(loss)):
            return loss, None, None
        grads = G.gradient()
        self.counters["backward"] += 1 + math.ceil(out.numel() / self.chunk_size)
        grads = self._with_decay(grads)
        if not is_finite(*grads):
            return loss, None, None
        return loss, grads, _curvature_from(G, self.fisher, self.chunk_size)

    def _with_decay(self, grads: list[Tensor]) -> list[Tensor]:
        wd = self.hyper("weight_decay")
        if not wd:
            return grads
        return [g + wd * p.detach() for g, p in zip(grads, self.params.values())]

    def _fast_curvature(self, layers, inputs, targets):
        """Per-example gradients from layer inputs and output derivatives (one backward per
        square-root column of the loss Hessian): exact when examples do not interact."""
        params = list(self.params.values())
        cap = FactorCapture(layers)
        torch.clear_autocast_cache()  # parameters changed in place since the last forward
        with cap:
            out = self.model(inputs)
        self.counters["forward"] += 1
        self.rule.check(out, targets)
        loss = self.loss_fn(out, targets)
        if not math.isfinite(float(loss.detach())):
            return loss.detach(), None, None
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = self._with_decay([torch.zeros_like(p) if g is None else g
                                  for g, p in zip(grads, params)])
        if not is_finite(*grads):
            return loss.detach(), None, None
        od = out.detach()
        if self.fisher == "type2":
            vectors, weight = self.rule.sqrt_hessian(od, targets), 1.0
        else:
            vectors = self.rule.per_example_grads(od, targets).unsqueeze(0)
            weight = 1.0 / od.shape[0] if self.rule.reduction == "mean" else 1.0
        weights = [layer.weight_param for layer in layers]
        names = list(self.params)
        F = None
        for k, vec in enumerate(vectors):
            torch.autograd.grad(out, weights, vec, retain_graph=k < len(vectors) - 1,
                                allow_unused=True)
            m = _per_example_matrix(layers, cap, names, self.params, k + 1)
            f = m.T @ m
            F = f if F is None else F + f
        self.counters["backward"] += 1 + len(vectors)
        return loss.detach(), grads, weight * F

    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        loss, d = self.direction(inputs, targets, update_buffers=True)
        if d is None:
            raise SkipStep("loss, gradient or curvature", loss)
        params = list(self.params.values())
        moms = self.group_values("momentum")
        with torch.no_grad():
            for p, t, mom, lr in zip(params, d, moms, self.group_values("lr"), strict=True):
                if mom:
                    buf = self.state[p].get("momentum_buffer")
                    t = mom * (torch.zeros_like(p) if buf is None else buf) + t
                    self.state[p]["momentum_buffer"] = t
                p.sub_(t, alpha=lr)
        return loss

    @property
    def momentum_buffers(self) -> list[Tensor]:
        """Heavy-ball buffers, one per parameter (zeros before the first momentum step)."""
        return [self.state[p]["momentum_buffer"] if "momentum_buffer" in self.state[p]
                else torch.zeros_like(p) for p in self.params.values()]

    # ---- deprecated names ----------------------------------------------------------------
    buf = deprecated_alias("buf", "momentum_buffers (state[p]['momentum_buffer'])",
                           lambda self: self.momentum_buffers)
    count = deprecated_alias("count", "steps", lambda self: self.steps)
    curvature = deprecated_alias(
        "curvature", "fisher",
        lambda self: {"type2": "ggn", "empirical": "empirical"}[self.fisher])
