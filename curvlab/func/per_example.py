r"""Per-example gradients by ``torch.func.vmap(torch.func.grad(...))``.

Convention: the gradient for example ``n`` is that of example ``n``'s **own loss**, i.e.
``loss_fn`` applied to that single example (``output[n:n+1]``, ``target[n:n+1]``) with the loss's
own reduction. For ``reduction='sum'`` these sum to the batch gradient; for ``'mean'`` over
examples the batch gradient is their average (for cross-entropy with ``ignore_index`` or class
weights the single example's own mean, over its own non-ignored positions, is used).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.params import cloned_buffers

__all__ = ["per_example_grads", "per_example_output_grads"]


def per_example_output_grads(
    loss_fn: Callable[[Tensor, Tensor], Tensor], output: Tensor, target: Any
) -> Tensor:
    r"""Gradient of each example's own loss w.r.t. its own output row, stacked like ``output``.

    Example:
        >>> out, y = torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1)
        >>> per_example_output_grads(torch.nn.MSELoss(), out, y)  # 2 (out_n - y_n)
        tensor([[2.],
                [6.]])
    """

    def single(o: Tensor, t: Any) -> Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(single))(output.detach(), target)


def per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> dict[str, Tensor]:
    r"""Gradient of each example's own loss w.r.t. ``params``: ``{name: (N, *shape)}``.

    Each example is run through ``model`` alone (batch of one, buffers cloned so nothing the
    model owns changes); ``inputs`` and ``targets`` are split along dim 0. Models whose output
    for one example depends on the others (BatchNorm in training mode) have no per-example
    loss; their result is that of the example evaluated alone.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        params: Ordered ``{name: parameter}`` (e.g. :func:`curvlab.func.select_params`).
        inputs: Batch input (a tensor, examples along dim 0).
        targets: Batch targets (examples along dim 0).

    Example:
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> _ = net.weight.data.fill_(1.0)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> per_example_grads(net, torch.nn.MSELoss(reduction="sum"), dict(net.named_parameters()),
        ...                   x, y)["weight"]  # 2 (w.x_n) x_n
        tensor([[[2., 0.]],
        <BLANKLINE>
                [[0., 8.]]])
    """
    buffers = cloned_buffers(model)
    primals = {n: p.detach() for n, p in params.items()}

    def single(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, ({**primals, **p}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(primals, inputs, targets)
