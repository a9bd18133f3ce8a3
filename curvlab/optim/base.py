r"""The one contract of every curvlab optimizer, on ``torch.optim.Optimizer``.

A curvlab optimizer owns the forward pass (as in kfac-jax): ``loss = opt.step(inputs,
targets)`` runs the forward, the backward(s) and the update, and returns the mini-batch loss
before the update (0-dim, detached). Subclassing :class:`torch.optim.Optimizer` gives it
``param_groups`` — ``lr``, ``damping``, ``weight_decay`` and ``momentum`` live there, where
``torch.optim.lr_scheduler`` schedulers, step hooks and checkpoint tools find them — and
torch's ``state_dict`` layout (``state`` per parameter, ``param_groups``), to which curvlab adds
one entry ``"curvlab"`` (counters, parameter names, and whatever else the optimizer keeps:
Kronecker factors, the adaptive damping's γ, generator states). ``load_state_dict`` of a saved
state resumes bit-exactly.

Non-finite values. A step that meets a NaN/Inf (loss, gradient, curvature, update) raises
:class:`SkipStep` internally before it changes any state; :meth:`CurvatureOptimizer.step` then
restores the model's buffers (BatchNorm running statistics) and the optimizer's random
generator, counts ``counters["skipped_steps"]``, warns (``RuntimeWarning``) and returns the
loss: parameters and optimizer state are untouched.

Counters (``opt.counters``): ``forward``, ``backward``, ``jvp``, ``ggn_products``, ``steps``,
``skipped_steps`` (optimizers add their own, e.g. ``factor_updates``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.params import ParamsArg, select_params
from curvlab.optim._common import new_counters, restore_buffers, snapshot_buffers, warn_skip

__all__ = ["CurvatureOptimizer", "SkipStep", "deprecated_kwarg"]


class SkipStep(Exception):
    """Raised inside :meth:`CurvatureOptimizer._step` to skip a step with a non-finite value.

    Args:
        what: What was not finite (shown in the warning).
        loss: The loss to return from :meth:`~CurvatureOptimizer.step`.
    """

    def __init__(self, what: str, loss: Tensor) -> None:
        super().__init__(what)
        self.what = what
        self.loss = loss


def deprecated_kwarg(kwargs: dict[str, Any], old: str, new: str, who: str) -> Any:
    """Pop a renamed keyword: warn with a ``DeprecationWarning`` naming the new one."""
    value = kwargs.pop(old)
    warnings.warn(f"{who}: keyword {old!r} is deprecated, use {new!r}", DeprecationWarning,
                  stacklevel=3)
    return value


def _clone_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone_state(v) for v in value)
    return value


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""Base class: a ``torch.optim.Optimizer`` that owns the forward pass.

    Subclasses implement :meth:`_step` (raise :class:`SkipStep` before changing state when a
    value is not finite), and optionally :meth:`_extra_state` / :meth:`_load_extra_state` for
    state that is not per parameter.

    Args:
        model: The network.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        params: Parameter selection (:func:`curvlab.func.select_params`; default all trainable
            parameters), or a list of parameter-group dicts ``{"params": [...], "lr": ...}``
            as for any torch optimizer (the tensors must be parameters of ``model``).
        defaults: Default hyperparameters of the groups.

    Attributes:
        params: ``{name: parameter}`` of all selected parameters (flat order of
            :mod:`curvlab.func.params`).
        counters: Work and step counters.
        diagnostics: Per-step values of the last step (optimizer-specific keys).

    Example (gradient descent in this contract; a scheduler drives its ``lr``):
        >>> class GD(CurvatureOptimizer):
        ...     def __init__(self, model, loss_fn, lr=0.1):
        ...         super().__init__(model, loss_fn, None, {"lr": lr})
        ...     def _step(self, inputs, targets):
        ...         loss = self.loss_fn(self.model(inputs), targets)
        ...         grads = torch.autograd.grad(loss, list(self.params.values()))
        ...         with torch.no_grad():
        ...             for p, g, lr in zip(self.params.values(), grads, self.group_values("lr")):
        ...                 p.sub_(lr * g)
        ...         return loss.detach()
        >>> net = nn.Linear(2, 1)
        >>> opt = GD(net, nn.MSELoss())
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> _ = opt.step(torch.randn(4, 2), torch.randn(4, 1)); sched.step()
        >>> opt.param_groups[0]["lr"], opt.steps
        (0.05, 1)
    """

    #: Hyperparameters that must have one value over all groups (global-vector methods).
    global_hypers: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor] | None,
                 params: ParamsArg | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable, got "
                            f"{type(loss_fn).__name__}")
        groups = self._groups(model, params)
        self.model = model
        self.loss_fn = loss_fn
        by_id = {id(p): p for g in groups for p in g["params"]}
        self.params: dict[str, Tensor] = {n: p for n, p in model.named_parameters()
                                          if id(p) in by_id}
        super().__init__(groups, defaults)
        self.counters: dict[str, int] = new_counters()
        self.diagnostics: dict[str, Any] = {}
        self._has_buffers = any(True for _ in model.buffers())

    @staticmethod
    def _groups(model: nn.Module, params: Any) -> list[dict[str, Any]]:
        if isinstance(params, list | tuple) and params and all(isinstance(g, dict)
                                                                for g in params):
            owned = {id(p) for p in model.parameters()}
            groups = []
            for i, g in enumerate(params):
                ps = list(g["params"]) if not isinstance(g["params"], Tensor) else [g["params"]]
                bad = [j for j, p in enumerate(ps) if id(p) not in owned]
                if bad:
                    raise ValueError(f"param group {i}: tensors {bad} are not parameters of "
                                     "the model")
                groups.append({**g, "params": ps})
            return groups
        return [{"params": list(select_params(model, params).values())}]

    # ---- hyperparameters -----------------------------------------------------------------
    def hyper(self, key: str) -> Any:
        """The value of hyperparameter ``key``; raises if groups disagree where the method
        needs one value (``global_hypers``)."""
        values = [g[key] for g in self.param_groups]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"{type(self).__name__}: {key!r} differs between parameter groups "
                             f"({values}); this optimizer needs one value")
        return values[0]

    def set_hyper(self, key: str, value: Any) -> None:
        """Set hyperparameter ``key`` in every parameter group."""
        for g in self.param_groups:
            g[key] = value

    def group_values(self, key: str) -> list[Any]:
        """``key`` of each selected parameter's group, in the order of :attr:`params`."""
        by_id = {id(p): g[key] for g in self.param_groups for p in g["params"]}
        return [by_id[id(p)] for p in self.params.values()]

    @property
    def steps(self) -> int:
        """Completed (not skipped) steps."""
        return self.counters["steps"]

    # ---- the step ------------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        """Random generators whose state a skipped step restores."""
        return []

    def step(self, inputs: Any = None, targets: Any = None) -> Tensor:  # type: ignore[override]
        """One optimization step on the mini-batch; returns the loss before the update."""
        if inputs is None and targets is None:
            raise TypeError(f"{type(self).__name__}.step(inputs, targets): this optimizer "
                            "runs the forward pass itself; pass the mini-batch")
        for key in self.global_hypers:
            self.hyper(key)
        buffers = snapshot_buffers(self.model) if self._has_buffers else None
        gens = [(g, g.get_state()) for g in self._generators()]
        try:
            loss = self._step(inputs, targets)
        except SkipStep as skip:
            if buffers is not None:
                restore_buffers(self.model, buffers)
            for g, s in gens:
                g.set_state(s)
            self.counters["skipped_steps"] += 1
            warn_skip(type(self).__name__, skip.what, self.counters["skipped_steps"])
            return skip.loss
        self.counters["steps"] += 1
        return loss

    def _step(self, inputs: Any, targets: Any) -> Tensor:
        raise NotImplementedError

    # ---- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state``, ``param_groups``) plus ``"curvlab"``; tensors cloned."""
        sd = super().state_dict()
        sd = {"state": _clone_state(sd["state"]), "param_groups": _clone_state(
            sd["param_groups"])}
        sd["curvlab"] = {"counters": dict(self.counters), "param_names": list(self.params),
                         "diagnostics": dict(self.diagnostics),
                         **_clone_state(self._extra_state())}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the parameters themselves are the model's)."""
        if "curvlab" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a curvlab optimizer "
                             "state (no 'curvlab' entry)")
        extra = state_dict["curvlab"]
        if extra["param_names"] != list(self.params):
            raise ValueError(f"{type(self).__name__}.load_state_dict: state is for parameters "
                             f"{extra['param_names']}, this optimizer has {list(self.params)}")
        super().load_state_dict({"state": _clone_state(state_dict["state"]),
                                 "param_groups": state_dict["param_groups"]})
        self.counters = dict(extra["counters"])
        self.diagnostics = dict(extra.get("diagnostics", {}))
        self._load_extra_state(_clone_state(extra))

    # ---- deprecated names ----------------------------------------------------------------
    @property
    def last(self) -> dict[str, Any]:
        """Deprecated alias of :attr:`diagnostics`."""
        warnings.warn(f"{type(self).__name__}.last is deprecated, use .diagnostics",
                      DeprecationWarning, stacklevel=2)
        return self.diagnostics
