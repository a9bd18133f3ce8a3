"""First-order and quasi-Newton baselines from ``torch.optim`` behind the curvlab step interface.

``TorchOptimizer(model, loss_fn, torch.optim.SGD, lr=..., momentum=...)`` wraps any
``torch.optim.Optimizer``; closure-based ones (``torch.optim.LBFGS``) get a closure that
recomputes the loss on the same mini-batch. The loss is whatever ``loss_fn`` returns (mean or
sum as the loss defines it); weight decay is the wrapped optimizer's own ``weight_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import select_params
from curvlab.func.params import ParamsArg
from curvlab.optim.base import CurvatureOptimizer, SkipStep

__all__ = ["TorchOptimizer"]


class _NonFinite(Exception):
    pass


class TorchOptimizer(CurvatureOptimizer):
    """A ``torch.optim`` optimizer with ``loss = opt.step(inputs, targets)`` and counters.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, target) -> scalar``.
        optimizer_cls: A ``torch.optim.Optimizer`` subclass (SGD, Adam, LBFGS, ...).
        params: Parameter selection (default: all trainable parameters).
        **kwargs: Passed to ``optimizer_cls``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own (the same
    objects), so ``torch.optim.lr_scheduler`` schedulers drive it; ``state_dict()`` is the
    wrapped optimizer's plus the ``"curvlab"`` entry.

    A non-finite loss or gradient skips the step (parameters, buffers and optimizer state
    untouched) with a warning. For LBFGS only the first evaluation of a step is checked;
    ``counters["forward"]`` counts every closure evaluation.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = TorchOptimizer(net, torch.nn.MSELoss(), torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> first = opt.step(x, y)
        >>> opt.counters["steps"], opt.counters["backward"]
        (1, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        params: ParamsArg = None,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_cls, type)
                and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        selected = select_params(model, params)
        super().__init__(model, loss_fn, selected, {})
        self.optimizer = optimizer_cls(list(self.params.values()), **kwargs)
        self._alias()
        self.closure_based = isinstance(self.optimizer, torch.optim.LBFGS)

    def _alias(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def _loss(self, inputs: Any, targets: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        torch.clear_autocast_cache()  # LBFGS re-evaluates after in-place updates
        loss = self.loss_fn(self.model(inputs), targets)
        self.counters["forward"] += 1
        return loss

    def _step(self, inputs: Any, targets: Tensor) -> Tensor:
        """One optimizer step on the mini-batch; returns the loss before the update."""
        if self.closure_based:
            first: list[Tensor] = []

            def closure() -> Tensor:
                with torch.enable_grad():
                    loss = self._loss(inputs, targets)
                    if not first and not math.isfinite(float(loss.detach())):
                        first.append(loss.detach())
                        raise _NonFinite
                    loss.backward()
                self.counters["backward"] += 1
                if not first:
                    first.append(loss.detach())
                return loss

            try:
                self.optimizer.step(closure)
            except _NonFinite:
                self._skip(first[0], "loss")
            return first[0]

        with torch.enable_grad():
            loss = self._loss(inputs, targets)
            if not math.isfinite(float(loss.detach())):
                self._skip(loss.detach(), "loss")
            loss.backward()
        self.counters["backward"] += 1
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._skip(loss.detach(), "gradient")
        self.optimizer.step()
        return loss.detach()

    def _skip(self, loss: Tensor, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        raise SkipStep(f"{what} ({type(self.optimizer).__name__})", loss)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state`` and ``param_groups`` (copied) plus ``"curvlab"``."""
        import copy

        sd = copy.deepcopy(self.optimizer.state_dict())
        sd["curvlab"] = {"counters": dict(self.counters), "param_names": list(self.params),
                         "diagnostics": dict(self.diagnostics)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (copied: the same state can seed several optimizers).

        The old layout ``{"optimizer": ..., "counters": ...}`` is still accepted."""
        import copy

        if "optimizer" in state_dict and "curvlab" not in state_dict:
            self.optimizer.load_state_dict(copy.deepcopy(state_dict["optimizer"]))
            self.counters = dict(state_dict["counters"])
        else:
            if "curvlab" not in state_dict:
                raise ValueError("TorchOptimizer.load_state_dict: not a curvlab optimizer "
                                 "state (no 'curvlab' entry)")
            extra = state_dict["curvlab"]
            if extra["param_names"] != list(self.params):
                raise ValueError(f"TorchOptimizer.load_state_dict: state is for parameters "
                                 f"{extra['param_names']}, this optimizer has "
                                 f"{list(self.params)}")
            self.optimizer.load_state_dict(copy.deepcopy(
                {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}))
            self.counters = dict(extra["counters"])
            self.diagnostics = dict(extra.get("diagnostics", {}))
        self._alias()

    def __repr__(self) -> str:
        return f"TorchOptimizer({type(self.optimizer).__name__}, {self.optimizer.defaults})"
