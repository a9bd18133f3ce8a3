"""Dense float64 curvature oracles of ``loss_fn(model(x), y)`` on one batch, in curvlab flat order.

Built only from ``torch.func``/``torch.autograd.functional`` and the loss's own definition (never
from curvlab's rules). Train-mode BatchNorm is handled once here: functorch's ``vmap``-ed
``hessian``/``jacrev`` mishandle it, so those models use ``torch.autograd.functional`` (as do
models with ``nn.Embedding`` for the Hessian, see :func:`dense_hessian`). Models
with integer inputs (token ids) work as is: only the flat parameter vector is differentiated.

* :func:`dense_hessian` -- the Hessian of the batch loss.
* :func:`dense_ggn` -- :math:`J^\\top H_L J` with :math:`H_L` the loss Hessian in output space.
* :func:`dense_fisher` -- the true (type-2, exact expectation) Fisher :math:`J^\\top F_L J`:
  per loss term, the expected outer product of the log-likelihood gradient under the model's
  predictive distribution, times the term's weight in the loss (cross-entropy: categorical,
  weights from PyTorch's ``reduction='none'`` values; MSE: Gaussian with variance 1/2; BCE:
  Bernoulli).
* :func:`dense_ef` -- empirical Fisher :math:`w\\sum_n g_n g_n^\\top`, ``g_n`` the gradient of
  example ``n``'s own loss (``w = 1/N`` for 'mean'); an example whose targets are all ignored
  has no loss and contributes 0.
* :func:`aggregate` -- the oracle of a list of batches with explicit weights.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.func.params import cloned_buffers

DT = torch.float64


def _math_attention():
    """Forward-mode AD (``torch.func.hessian``) needs attention's math kernel on the CPU."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def theta_of(model: nn.Module, names: list[str]) -> tuple[Tensor, list[torch.Size]]:
    named = dict(model.named_parameters())
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    return theta, [named[n].shape for n in names]


def flat_fn(model: nn.Module, names: list[str], shapes):
    """``call(theta, x)``: the model at flat parameters ``theta`` (others fixed, buffers cloned)."""
    sizes = [math.prod(s) for s in shapes]
    buffers = cloned_buffers(model)

    def call(theta, x):
        parts = torch.split(theta, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(model, (p, buffers), (x,))

    return call


def has_train_bn(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


def all_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def jacobian(model, x, names) -> tuple[Tensor, Tensor]:
    """``(J, out)``: the ``(out.numel(), P)`` Jacobian of the output and the output."""
    theta, shapes = theta_of(model, names)
    call = flat_fn(model, names, shapes)
    out = call(theta, x).detach()
    if has_train_bn(model):
        jac = torch.autograd.functional.jacobian(lambda t: call(t, x), theta)
    else:
        jac = torch.func.jacrev(lambda t: call(t, x))(theta)
    return jac.reshape(out.numel(), -1), out


def output_hessian(loss_fn, out: Tensor, y) -> Tensor:
    """``(m, m)`` Hessian of ``loss_fn(., y)`` at ``out`` (``m = out.numel()``)."""
    with _math_attention():
        h = torch.func.hessian(lambda o: loss_fn(o, y))(out)
    return h.reshape(out.numel(), out.numel())


def _functorch_hessian_unreliable(model: nn.Module) -> bool:
    """Train-mode BatchNorm, and ``nn.Embedding``: ``vmap`` over ``jvp(grad)`` (which
    ``torch.func.hessian`` is) gets the cross terms of a broadcast positional embedding wrong in
    torch 2.13, while the unbatched ``jvp(grad)`` and double backward agree."""
    return has_train_bn(model) or any(isinstance(m, nn.Embedding) for m in model.modules())


def dense_hessian(model, loss_fn, x, y, names) -> Tensor:
    theta, shapes = theta_of(model, names)
    call = flat_fn(model, names, shapes)
    with _math_attention():  # double backward / forward AD through attention
        if _functorch_hessian_unreliable(model):
            return torch.autograd.functional.hessian(lambda t: loss_fn(call(t, x), y), theta)
        return torch.func.hessian(lambda t: loss_fn(call(t, x), y))(theta)


def dense_ggn(model, loss_fn, x, y, names) -> Tensor:
    jac, out = jacobian(model, x, names)
    return jac.T @ output_hessian(loss_fn, out, y) @ jac


def dense_ef(model, loss_fn, x, y, names) -> Tensor:
    """(1/N or 1) sum_n g_n g_n^T from vmap-ed per-example gradients."""
    theta, shapes = theta_of(model, names)
    call = flat_fn(model, names, shapes)

    def single(t, xn, yn):
        return loss_fn(call(t, xn.unsqueeze(0)), yn.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(theta, x, y)
    grads = torch.nan_to_num(grads, nan=0.0)  # all targets ignored: no loss (PyTorch: nan)
    scale = 1.0 / x.shape[0] if loss_fn.reduction == "mean" else 1.0
    return scale * grads.T @ grads


def output_fisher(loss_fn, out: Tensor, y) -> Tensor:
    """``(m, m)`` exact expected outer product of the likelihood gradient, per loss term."""
    m = out.numel()
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        c = out.shape[1]
        z = out.movedim(1, -1).reshape(-1, c)  # positions x classes
        # weight a_i of each term: PyTorch's per-term value at uniform logits is s_i log C, and
        # the 'mean' divides by D = sum_i(s_i log C) / (mean loss at uniform logits)
        none = nn.CrossEntropyLoss(weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
                                   label_smoothing=loss_fn.label_smoothing, reduction="none")
        zero = torch.zeros_like(out)
        per_term = none(zero, y).reshape(-1)
        a = per_term / math.log(c)
        if loss_fn.reduction == "mean":
            total = per_term.sum()
            a = a * (loss_fn(zero, y) / total) if total > 0 else torch.zeros_like(a)
        blocks = []
        for i in range(z.shape[0]):
            p = z[i].softmax(0)
            jl = torch.func.jacrev(lambda t: -F.log_softmax(t, 0))(z[i])  # row k: grad -log p_k
            blocks.append(a[i] * jl.T @ torch.diag(p) @ jl)  # sum_k p_k g_k g_k^T
        moved = torch.block_diag(*blocks)
        perm = torch.arange(m).reshape(out.shape).movedim(1, -1).reshape(-1)
        fisher = torch.zeros(m, m, dtype=out.dtype)
        fisher[perm[:, None], perm[None, :]] = moved
        return fisher
    scale = 1.0 / m if loss_fn.reduction == "mean" else 1.0
    if isinstance(loss_fn, nn.MSELoss):
        return 2.0 * scale * torch.eye(m, dtype=out.dtype)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        p = out.sigmoid().reshape(-1)
        return scale * torch.diag(p * (1 - p))
    raise TypeError(f"no likelihood oracle for {type(loss_fn).__name__}")


def dense_fisher(model, loss_fn, x, y, names) -> Tensor:
    jac, out = jacobian(model, x, names)
    return jac.T @ output_fisher(loss_fn, out, y) @ jac


def units(loss_fn, out_shape) -> int | float:
    """Weight of a batch under 'mean' reduction (what its mean divides by)."""
    if loss_fn.reduction == "sum":
        return 1
    numel = math.prod(out_shape)
    return numel // out_shape[1] if isinstance(loss_fn, nn.CrossEntropyLoss) else numel


def aggregate(oracle, model, loss_fn, batches, names, by_examples=False) -> Tensor:
    """The oracle over several batches: batch results weighted as one concatenated batch."""
    total, weight = 0.0, 0
    for x, y in batches:
        with torch.no_grad():
            out = torch.func.functional_call(model, ({}, cloned_buffers(model)), (x,))
        w = (
            (1 if loss_fn.reduction == "sum" else x.shape[0])
            if by_examples
            else units(loss_fn, out.shape)
        )
        total = total + w * oracle(model, loss_fn, x, y, names)
        weight += w
    return total / (weight if loss_fn.reduction == "mean" else 1)
