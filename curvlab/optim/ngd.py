r"""Exact damped natural gradient with the dense mini-batch Fisher/GGN (small models only).

Each step builds the dense curvature of the batch loss ``L = loss_fn(model(x), y)`` (the loss's
own reduction, curvlab's flat parameter order):

* ``curvature='ggn'`` (default): :math:`F = J^\top H_L J`, equal to the Fisher of the model's
  predictive distribution for cross-entropy, MSE (Gaussian with variance 1/2) and
  BCE-with-logits;
* ``curvature='empirical'``: :math:`F = w \sum_n g_n g_n^\top` (``g_n`` the gradient of example
  ``n``'s own loss, ``w = 1/N`` for ``'mean'``, 1 for ``'sum'``),

from explicit Jacobian rows (``Linearization.vjp_batched`` over unit output cotangents in
chunks; BatchNorm's cross-example coupling is therefore exact) and takes
:math:`\theta \leftarrow \theta - \mathrm{lr}\, b`, :math:`b \leftarrow \mu b + (F + \lambda
I)^{-1}(g + \eta\theta)` solved by Cholesky (in ``solve_dtype``, float64 by default; a failed
factorization retries with 10× more damping, up to 3 times, then skips the step). Refuses
models with more than ``max_params`` selected parameters (``P² `` memory, ``P³`` time).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.linearize import linearize
from curvlab.func.losses import AutodiffLossRule, loss_rule
from curvlab.func.params import ParamsArg, select_params
from curvlab.kfac import FactorCapture, find_layers
from curvlab.optim._common import (
    check_hyper,
    is_finite,
    new_counters,
    restore_buffers,
    snapshot_buffers,
    warn_skip,
)

__all__ = ["NaturalGradient", "dense_curvature"]


def _jacobian_rows(lin, out: Tensor, chunk: int) -> Tensor:
    """Jacobian of ``out`` (all entries, row-major) w.r.t. the selected parameters,
    ``(out.numel(), P)``."""
    m = out.numel()
    rows = []
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        cot = torch.zeros(stop - start, m, dtype=out.dtype, device=out.device)
        cot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        grads = lin.vjp_batched(cot.reshape(stop - start, *out.shape))
        rows.append(torch.cat([g.reshape(stop - start, -1) for g in grads], dim=1))
    return torch.cat(rows)


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
    if table.unsupported:
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


def dense_curvature(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    params: ParamsArg = None,
    curvature: str = "ggn",
    chunk_size: int = 256,
) -> Tensor:
    r"""Dense ``P × P`` GGN or empirical Fisher of the batch loss (curvlab flat order).

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> F = dense_curvature(net, torch.nn.CrossEntropyLoss(), torch.randn(4, 2),
        ...                     torch.tensor([0, 1, 2, 0]))
        >>> F.shape, bool(torch.allclose(F, F.T))
        (torch.Size([9, 9]), True)
    """
    selected = select_params(model, params)
    lin = linearize(model, selected, inputs)
    return _curvature_from(lin, loss_rule(loss_fn), targets, curvature, chunk_size)


def _curvature_from(lin, rule, targets: Tensor, curvature: str, chunk: int) -> Tensor:
    out = lin.output.detach()
    rule.check(out, targets)
    jac = _jacobian_rows(lin, out, chunk)  # (M, P)
    m = out.numel()
    if curvature == "ggn":
        # H_L J: loss-Hessian products on each column of J (reshaped like the output)
        cols = jac.T.reshape(-1, *out.shape)
        hj = torch.func.vmap(lambda v: rule.hessian_vp(out, targets, v))(cols)
        return jac.T @ hj.reshape(-1, m).T
    if curvature == "empirical":
        n = out.shape[0]
        g = rule.per_example_grads(out, targets).reshape(n, -1)  # (N, m/N)
        per = torch.einsum("nk,nkp->np", g, jac.reshape(n, -1, jac.shape[1]))
        w = 1.0 / n if rule.reduction == "mean" else 1.0
        return w * per.T @ per
    raise ValueError(f"curvature must be 'ggn' or 'empirical', got {curvature!r}")


class NaturalGradient:
    r"""Exact damped natural-gradient descent on small models (dense ``F``, Cholesky solve).

    Args:
        model: The network (single-tensor output).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        lr: Step size.
        damping: ``λ`` added to the curvature.
        momentum: Heavy-ball momentum on the natural-gradient direction.
        weight_decay: ``η``: ℓ2 term ``(η/2)‖θ‖²`` (gradient ``ηθ``, curvature ``+ηI``).
        curvature: ``'ggn'`` (= Fisher for the supported likelihood losses) or ``'empirical'``.
        solve_dtype: dtype of the dense solve (float64 default).
        max_params: Refuse (``ValueError``) models with more selected parameters.
        params: Parameter selection (default all trainable).
        chunk_size: Jacobian rows per batched backward.
        per_example: Use the fast path when it applies: all selected parameters in
            ``nn.Linear``/``nn.Conv2d`` layers, no BatchNorm in training mode (examples do not
            interact) and a closed-form loss rule; per-example gradients of each square-root
            column of ``H_L`` come from the layer inputs and output derivatives (one backward per
            column). Otherwise explicit Jacobian rows (batched backward over unit cotangents).

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

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lr: float = 1.0,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        curvature: str = "ggn",
        solve_dtype: torch.dtype = torch.float64,
        max_params: int = 5000,
        params: ParamsArg = None,
        chunk_size: int = 256,
        per_example: bool = True,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.rule = loss_rule(loss_fn)
        self.params = select_params(model, params)
        count = sum(p.numel() for p in self.params.values())
        if count > max_params:
            raise ValueError(
                f"NaturalGradient: the model has {count} selected parameters, above the cap "
                f"max_params={max_params} (dense P x P curvature and Cholesky solve); use "
                "curvlab.optim.KFACOptimizer, select fewer params=, or raise max_params"
            )
        self.num_params = count
        self.lr = check_hyper("lr", lr, minimum=0.0, strict=True)
        self.damping = check_hyper("damping", damping, minimum=0.0)
        self.momentum = check_hyper("momentum", momentum, minimum=0.0)
        self.weight_decay = check_hyper("weight_decay", weight_decay, minimum=0.0)
        if curvature not in ("ggn", "empirical"):
            raise ValueError(f"curvature must be 'ggn' or 'empirical', got {curvature!r}")
        self.curvature = curvature
        if solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or float64, got {solve_dtype}")
        self.solve_dtype = solve_dtype
        self.chunk_size = int(chunk_size)
        self.per_example = bool(per_example)
        self._fast_layers = _per_example_path(model, self.params) if self.per_example else None
        self.buf = [torch.zeros_like(p) for p in self.params.values()]
        self.count = 0
        self.counters = new_counters()

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
        lam = self.damping + self.weight_decay
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
        lin = linearize(self.model, self.params, inputs, update_buffers=update_buffers)
        self.counters["forward"] += 1
        out = lin.output.detach()
        self.rule.check(out, targets)
        loss = self.rule.value(out, targets).detach()
        if not math.isfinite(float(loss)):
            return loss, None, None
        grads = lin.vjp(self.rule.grad(out, targets))
        self.counters["backward"] += 1 + math.ceil(out.numel() / self.chunk_size)
        grads = self._with_decay(grads)
        if not is_finite(*grads):
            return loss, None, None
        return loss, grads, _curvature_from(lin, self.rule, targets, self.curvature,
                                            self.chunk_size)

    def _with_decay(self, grads: list[Tensor]) -> list[Tensor]:
        if not self.weight_decay:
            return grads
        return [g + self.weight_decay * p.detach() for g, p in zip(grads, self.params.values())]

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
        if self.curvature == "ggn":
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

    def step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One damped natural-gradient step; returns the loss before the update."""
        buffers = snapshot_buffers(self.model)
        loss, d = self.direction(inputs, targets, update_buffers=True)
        if d is None:
            restore_buffers(self.model, buffers)
            self.counters["skipped_steps"] += 1
            warn_skip("NaturalGradient", "loss, gradient or curvature",
                      self.counters["skipped_steps"])
            return loss
        if self.momentum:
            self.buf = [self.momentum * b + t for b, t in zip(self.buf, d)]
            d = self.buf
        with torch.no_grad():
            for p, t in zip(self.params.values(), d):
                p.sub_(t, alpha=self.lr)
        self.count += 1
        self.counters["steps"] += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffer, step count and counters."""
        return {"buf": [b.clone() for b in self.buf], "count": self.count,
                "counters": dict(self.counters), "param_names": list(self.params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        if state["param_names"] != list(self.params):
            raise ValueError(f"NaturalGradient.load_state_dict: state is for parameters "
                             f"{state['param_names']}, this optimizer has {list(self.params)}")
        self.buf = [b.clone() for b in state["buf"]]
        self.count = int(state["count"])
        self.counters = dict(state["counters"])
