"""Functional linearization engine: ``torch.func.jvp`` of the whole model per tangent.

The fallback for models ``torch.fx`` cannot trace (data-dependent control flow). One extra
forward per product; the RNG state of the recorded forward is replayed so dropout masks match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func.linearization import Linearization
from curvlab.func.params import cloned_buffers
from curvlab.func.rng import replay_rng, rng_state, tensor_leaves

__all__ = ["FunctionalLinearization"]


class FunctionalLinearization(Linearization):
    """Functional engine: every tangent is ``torch.func.jvp`` of the whole model."""

    engine = "functional"

    def __init__(self, model: nn.Module, params: dict[str, Tensor], inputs: Any,
                 update_buffers: bool) -> None:
        names = list(params)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        super().__init__(names, leaves)
        self._model = model
        self._inputs = inputs
        self._primals = {n: p.detach() for n, p in params.items()}
        self._rng = rng_state(tensor_leaves(inputs))
        buffers = dict(model.named_buffers()) if update_buffers else cloned_buffers(model)
        self._buffers_for_jvp = cloned_buffers(model)
        with torch.enable_grad():
            self.output = torch.func.functional_call(
                model, (dict(zip(names, leaves, strict=True)), buffers), (inputs,)
            )
        if not isinstance(self.output, Tensor):
            raise TypeError(
                f"linearize: the model must return a single tensor, got "
                f"{type(self.output).__name__}"
            )

    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        if not tangents:
            return None
        primal = {n: self._primals[n] for n in tangents}
        buffers = {
            n: (None if b is None else b.clone()) for n, b in self._buffers_for_jvp.items()
        }

        def f(p):
            return torch.func.functional_call(self._model, ({**self._primals, **p}, buffers),
                                              (self._inputs,))

        with replay_rng(self._rng):
            return torch.func.jvp(f, (primal,), (dict(tangents),))[1]
