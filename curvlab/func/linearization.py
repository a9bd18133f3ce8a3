"""The :class:`Linearization` interface shared by both linearization engines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from curvlab.func.forward_ad import forward_ad_kernels

__all__ = ["Linearization"]


class Linearization:
    r"""A model linearized at the current parameters (see :func:`linearize`).

    Attributes:
        output: The model output, with autograd graph to the selected parameters.
        names: Selected parameter names, in order.
        engine: ``"layerwise"`` or ``"functional"``.

    Example:
        >>> from curvlab.func import linearize
        >>> net = torch.nn.Linear(3, 2)
        >>> lin = linearize(net, dict(net.named_parameters()), torch.ones(4, 3))
        >>> u = lin.jvp([torch.ones(2, 3), torch.zeros(2)])     # J v: each output moves by 3
        >>> u[0]
        tensor([3., 3.])
        >>> [g.shape for g in lin.vjp(torch.ones_like(lin.output))]  # J^T r
        [torch.Size([2, 3]), torch.Size([2])]
    """

    output: Tensor
    names: list[str]
    engine: str

    def __init__(self, names: list[str], leaves: list[Tensor]) -> None:
        self.names = names
        self._leaves = leaves
        # the tangent passes replay the forward's autocast state (mixed precision)
        self._device_type = leaves[0].device.type if leaves else "cpu"
        self._autocast = (
            torch.is_autocast_enabled(self._device_type),
            torch.get_autocast_dtype(self._device_type),
        )

    def _autocast_context(self) -> torch.autocast:
        enabled, dtype = self._autocast
        return torch.autocast(self._device_type, dtype=dtype, enabled=enabled)

    # -- public -------------------------------------------------------------------------
    def jvp(self, tangents: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        r""":math:`J v`: tangent of the output for parameter tangents ``v`` (no graph kept).

        ``tangents`` is a dict keyed by the selected names or a list in their order; missing
        dict keys count as zero.
        """
        tdict = self._as_dict(tangents)
        with torch.no_grad(), self._autocast_context(), forward_ad_kernels():
            out = self._jvp(tdict)
        return torch.zeros_like(self.output) if out is None else out

    def vjp(self, cotangent: Tensor, retain_graph: bool = True) -> list[Tensor]:
        r""":math:`J^\top r` for an output cotangent ``r``, as a list in ``names`` order."""
        if cotangent.shape != self.output.shape:
            raise ValueError(
                f"cotangent has shape {tuple(cotangent.shape)}, expected the output's shape "
                f"{tuple(self.output.shape)}"
            )
        grads = torch.autograd.grad(
            self.output, self._leaves, cotangent, retain_graph=retain_graph, allow_unused=True
        )
        return [
            torch.zeros_like(leaf) if g is None else g
            for g, leaf in zip(grads, self._leaves, strict=True)
        ]

    def jvp_batched(self, tangents: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Like :meth:`jvp` for tangents with a leading batch dimension ``K`` (via ``vmap``)."""
        tdict = self._as_dict(tangents, batched=True)
        return torch.func.vmap(self.jvp)(tdict)

    def vjp_batched(self, cotangents: Tensor, retain_graph: bool = True) -> list[Tensor]:
        """Like :meth:`vjp` for cotangents with a leading batch dimension ``K``."""
        grads = torch.autograd.grad(
            self.output, self._leaves, cotangents, retain_graph=retain_graph, allow_unused=True,
            is_grads_batched=True,
        )
        k = cotangents.shape[0]
        return [
            leaf.new_zeros(k, *leaf.shape) if g is None else g
            for g, leaf in zip(grads, self._leaves, strict=True)
        ]

    # -- internals ----------------------------------------------------------------------
    def _as_dict(self, tangents, batched: bool = False) -> dict[str, Tensor]:
        if isinstance(tangents, Mapping):
            unknown = set(tangents) - set(self.names)
            if unknown:
                raise ValueError(f"tangents: unknown parameter names {sorted(unknown)}")
            tdict = dict(tangents)
        else:
            tangents = list(tangents)
            if len(tangents) != len(self.names):
                raise ValueError(
                    f"tangents: got {len(tangents)} tensors, expected {len(self.names)} "
                    f"({self.names})"
                )
            tdict = dict(zip(self.names, tangents, strict=True))
        for name, leaf in zip(self.names, self._leaves, strict=True):
            t = tdict.get(name)
            if t is None:
                continue
            shape = t.shape[1:] if batched else t.shape
            if shape != leaf.shape:
                raise ValueError(
                    f"tangent for {name!r} has shape {tuple(t.shape)}, expected "
                    f"{tuple(leaf.shape)}" + (" after the batch dimension" if batched else "")
                )
        return tdict

    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        raise NotImplementedError
