"""``torch.optim.Muon`` on the weight matrices with ``torch.optim.AdamW`` on everything else.

Muon (Jordan et al. 2024) orthogonalizes the momentum of a 2-D weight by Newton-Schulz
iterations; ``torch.optim.Muon`` accepts 2-D parameters only and its documentation advises a
standard method such as AdamW for the others. :class:`MuonAdamW` is that pairing as one
``torch.optim.Optimizer`` (so ``curvlab.optim.TorchOptimizer`` and ``torch.optim.lr_scheduler``
drive it): every parameter with ``ndim >= 2`` goes to Muon, a convolution filter
``(out, in, *kernel)`` as the matrix ``(out, in·prod(kernel))`` (Keller Jordan's reshaping; the
matrix is a view sharing the filter's storage), and biases and normalization affine parameters go
to AdamW. Learning rates: ``lr`` is Muon's (with torch's default ``adjust_lr_fn``, i.e. the update
is scaled by ``sqrt(max(1, out/in))``), ``adamw_lr`` AdamW's. Weight decay is decoupled in both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["MuonAdamW"]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on ``ndim >= 2`` parameters (filters flattened), AdamW on the rest.

    Args:
        params: Tensors (not parameter groups).
        lr: Muon's learning rate.
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's (torch defaults 0.95, True, 5, None).
        weight_decay: Decoupled weight decay of both parts (default 0).
        adamw_lr: AdamW's learning rate (default 1e-3).
        adamw_betas: AdamW's betas (default (0.9, 0.999)).
        muon_params: The parameters Muon updates (default: every one with ``ndim >= 2``);
            all others of ``params`` go to AdamW. A transformer, say, keeps its embedding and
            output head on AdamW by passing only the blocks' matrices here.

    ``param_groups`` is Muon's group (if any matrices) followed by AdamW's (if any other
    parameters), the inner optimizers' own dicts, so schedulers scale both learning rates.
    ``muon`` and ``adamw`` are the inner optimizers (``None`` when they have no parameters);
    ``state_dict()`` holds both.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(2, 1))
        >>> opt = MuonAdamW(net.parameters(), lr=0.02, adamw_lr=1e-3)
        >>> [tuple(p.shape) for p in opt.muon.param_groups[0]["params"]]
        [(2, 9), (1, 2)]
        >>> len(opt.adamw.param_groups[0]["params"])
        2
        >>> net(torch.randn(4, 1, 3, 3)).sum().backward()
        >>> before = net[0].weight.detach().clone()
        >>> opt.step()
        >>> bool((net[0].weight != before).any())
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.02,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        weight_decay: float = 0.0,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        muon_params: Iterable[Tensor] | None = None,
    ) -> None:
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError("MuonAdamW: params must be tensors, not parameter groups")
        if muon_params is None:
            chosen = {id(p) for p in params if p.ndim >= 2}
        else:
            chosen = {id(p) for p in muon_params}
            known = {id(p) for p in params}
            if not chosen <= known:
                raise ValueError("MuonAdamW: muon_params must be a subset of params")
            small = [tuple(p.shape) for p in params if id(p) in chosen and p.ndim < 2]
            if small:
                raise ValueError(f"MuonAdamW: muon_params must have ndim >= 2, got shapes "
                                 f"{small}")
        matrices = [p for p in params if id(p) in chosen]
        rest = [p for p in params if id(p) not in chosen]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "adamw_lr": adamw_lr}
        super().__init__([{"params": ps} for ps in (matrices, rest) if ps], defaults)
        # (filter, its matrix view): Muon updates the view in place, i.e. the filter
        self._views = [(p, p.detach().view(p.shape[0], -1)) for p in matrices if p.ndim > 2]
        views = {id(p): v for p, v in self._views}
        self._params = params
        self.muon = torch.optim.Muon(
            [views.get(id(p), p) for p in matrices], lr=lr, momentum=momentum,
            nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            weight_decay=weight_decay) if matrices else None
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, betas=adamw_betas,
                                       weight_decay=weight_decay) if rest else None
        self._alias()

    def _alias(self) -> None:
        self.param_groups = [g for opt in (self.muon, self.adamw) if opt is not None
                             for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon step on the matrices and one AdamW step on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, v in self._views:
            v.grad = None if p.grad is None else p.grad.view(v.shape)
        try:
            for opt in (self.muon, self.adamw):
                if opt is not None:
                    opt.step()
        finally:
            for _, v in self._views:
                v.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of the original parameters."""
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {"muon": ..., "adamw": ...}, "param_groups": [hyperparameters]}``."""
        inner = {name: opt.state_dict() for name, opt in (("muon", self.muon),
                                                          ("adamw", self.adamw))
                 if opt is not None}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": inner, "param_groups": copy.deepcopy(groups)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a MuonAdamW over parameters of the same shapes."""
        inner = state_dict.get("state", {})
        parts = (("muon", self.muon), ("adamw", self.adamw))
        for name, opt in parts:
            if (opt is None) != (name not in inner):
                raise ValueError(f"MuonAdamW.load_state_dict: the state's {name!r} part does "
                                 "not match this optimizer's parameters")
        for name, opt in parts:
            if opt is not None:
                opt.load_state_dict(inner[name])
        self._alias()
