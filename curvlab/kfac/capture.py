r"""Hooks that record what K-FAC needs: layer inputs and per-example output gradients.

:class:`FactorCapture` is a context manager. While it is active, a forward hook on each
registered layer

* stores the layer's *expanded input* of shape ``(N, T, fan_in)``: the input itself for a
  Linear layer (``T`` = product of the extra dims, 1 for ``(N, in)`` inputs) and the im2col
  patches (``F.unfold``; any stride, padding, dilation) for a Conv2d, ``T`` = number of output
  locations; the ones column for the bias is *not* included (see
  :func:`curvlab.kfac.factors.input_factor`);
* registers a **tensor hook on the module output** that stores the gradient reaching that output
  during each backward pass, reshaped to ``(N, T, out)``. Tensor hooks registered before an
  in-place op (``nn.ReLU(inplace=True)``, ``out += identity``) still receive the gradient of the
  layer's own output, unlike ``register_full_backward_hook``.

Gradients are whatever the backward pass propagates: for the gradient of a ``'mean'`` loss they
are per-example gradients divided by ``N``; :func:`curvlab.kfac.factors.output_factor` applies
the scale. One backward pass appends one tensor per layer, so ``output_grads[name][k]`` of
different layers belong to the same pass ``k`` (used for cross-layer statistics). Tensor hooks
fire for outputs computed while the context was active, also if ``backward`` runs after exit.

Shared weights (a layer called ``R > 1`` times in one forward, e.g. tied embeddings or a block
applied twice) follow **K-FAC-expand** (Eschenhagen et al., NeurIPS 2023): the calls are treated
like extra locations ``t``. :meth:`FactorCapture.layer_inputs` concatenates the calls' expanded
inputs along ``T`` and :meth:`FactorCapture.layer_output_grads` returns, per backward pass, the
gradients of all calls concatenated in the same call order (each gradient is tagged with the
call that produced its output, so the pairing is exact whatever order backward visits them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.kfac.attention import attention_forward
from curvlab.kfac.layers import KFACLayer, LayerTable

__all__ = ["FactorCapture", "expand_conv_input", "group_passes"]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def expand_conv_input(module: nn.Conv2d, x: Tensor, group: int | None = None) -> Tensor:
    """im2col patches of a Conv2d input: ``(N, T, C_in*kh*kw)``, ``T`` output locations.

    Column order matches ``module.weight.reshape(out, -1)`` (channel, kernel row, kernel column),
    so ``patches @ W.reshape(out, -1).T`` (plus bias) is the convolution output. For a grouped
    convolution pass ``group=j``: the patches of that group's input channels (``C_in/g``).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> p = expand_conv_input(conv, x)
        >>> p.shape
        torch.Size([4, 9, 18])
        >>> y = (p @ conv.weight.reshape(3, -1).T + conv.bias).transpose(1, 2).reshape(4, 3, 3, 3)
        >>> torch.allclose(y, conv(x), atol=1e-5)
        True
    """
    if x.dim() == 3:  # unbatched (C, H, W)
        x = x.unsqueeze(0)
    if module.groups != 1:
        if group is None or not 0 <= group < module.groups:
            raise ValueError(f"expand_conv_input: groups={module.groups} needs group in "
                             f"0..{module.groups - 1}, got {group!r}")
        c = x.shape[1] // module.groups
        x = x[:, group * c:(group + 1) * c]
    k = _pair(module.kernel_size)
    dil = _pair(module.dilation)
    stride = _pair(module.stride)
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:  # 'same' (stride 1): total padding dil*(k-1), extra on the right/bottom
            tot = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
            x = F.pad(x, [tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2])
            pad = (0, 0)
    cols = F.unfold(x, k, dilation=dil, padding=_pair(pad), stride=stride)
    return cols.transpose(1, 2)


class FactorCapture:
    """Record expanded layer inputs (forward) and output gradients (each backward pass).

    Args:
        layers: A :class:`~curvlab.kfac.layers.LayerTable` or iterable of
            :class:`~curvlab.kfac.layers.KFACLayer`.
        inputs: Record inputs (default ``True``).
        output_grads: Record output gradients (default ``True``).

    Attributes:
        inputs: ``{layer name: [expanded input (N, T, fan_in) per forward call]}``.
        output_grads: ``{layer name: [output gradient (N, T, out) per backward pass]}``.

    Example:
        >>> from curvlab.kfac.layers import find_layers
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
        >>> with FactorCapture(find_layers(net)) as cap:
        ...     net(torch.randn(5, 3)).sum().backward()
        >>> cap.verify()
        >>> cap.inputs["2"][0].shape, cap.output_grads["0"][0].shape
        (torch.Size([5, 1, 4]), torch.Size([5, 1, 4]))
    """

    def __init__(
        self,
        layers: LayerTable | Iterable[KFACLayer],
        *,
        inputs: bool = True,
        output_grads: bool = True,
    ) -> None:
        self.layers: list[KFACLayer] = list(layers.layers if isinstance(layers, LayerTable)
                                            else layers)
        for layer in self.layers:
            if not (isinstance(layer, KFACLayer) or getattr(layer, "kind", None) == "norm"):
                raise TypeError(f"layers must hold KFACLayer (or NormLayer) objects, got "
                                f"{type(layer).__name__}")
        self.record_inputs = inputs
        self.record_output_grads = output_grads
        self.inputs: dict[str, list[Tensor]] = {layer.name: [] for layer in self.layers}
        self.output_grads: dict[str, list[Tensor]] = {layer.name: [] for layer in self.layers}
        #: For each entry of ``output_grads[name]``: the forward call (index into
        #: ``inputs[name]``) whose output received it.
        self.grad_calls: dict[str, list[int]] = {layer.name: [] for layer in self.layers}
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._outputs: list[tuple[Tensor, int]] = []

    # ------------------------------------------------------------------ hooks
    def _record(self, layer: KFACLayer, x: Tensor, output: Tensor) -> None:
        call = len(self.inputs[layer.name])
        if self.record_inputs:
            self.inputs[layer.name].append(self._expand_input(layer, x.detach()))
        if self.record_output_grads and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._tensor_hook(layer, call))
            self._outputs.append((output, output._version))

    def _forward_hook(self, layer: KFACLayer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._record(layer, args[0], output)

        return hook

    def _tensor_hook(self, layer: KFACLayer, call: int):
        def hook(grad: Tensor) -> None:
            self.output_grads[layer.name].append(self._expand_grad(layer, grad.detach()))
            self.grad_calls[layer.name].append(call)

        return hook

    @staticmethod
    def _expand_input(layer: KFACLayer, x: Tensor) -> Tensor:
        if layer.kind == "norm":  # unit-wise blocks: normalized input, units last
            return layer.expand_input(x)
        if layer.kind == "conv2d":
            return expand_conv_input(layer.module, x, layer.group)
        if layer.kind == "embedding":  # token indices (N, T)
            return x.reshape(x.shape[0], -1).clone() if x.dim() > 1 else x.reshape(-1, 1).clone()
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return x.reshape(x.shape[0], -1, x.shape[-1]).clone()

    @staticmethod
    def _expand_grad(layer: KFACLayer, g: Tensor) -> Tensor:
        if layer.kind == "norm":
            return layer.expand_grad(g)
        if layer.kind == "conv2d":
            if g.dim() == 3:
                g = g.unsqueeze(0)
            return g[:, layer.out_slice].flatten(2).transpose(1, 2)
        if g.dim() == 1:
            g = g.unsqueeze(0)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    # ------------------------------------------------------------------ context
    def __enter__(self) -> FactorCapture:
        if self._handles or self._patched:
            raise RuntimeError("FactorCapture is already active (not re-entrant)")
        attention: dict[int, list[KFACLayer]] = {}
        for layer in self.layers:
            if layer.kind == "attention-in":
                attention.setdefault(id(layer.module), []).append(layer)
                continue
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        for group in attention.values():
            self._patch_attention(group)
        return self

    def _patch_attention(self, group: list[KFACLayer]) -> None:
        module = group[0].module
        by_proj = {layer.group: layer for layer in group}

        def record(j: int, x: Tensor, y: Tensor) -> None:
            if j in by_proj:
                self._record(by_proj[j], x, y)

        module.forward = attention_forward(module, record)
        self._patched.append(module)

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the forward hooks (tensor hooks already installed stay with their graph)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward  # back to the class's (fused) forward
        self._patched.clear()

    def clear(self) -> None:
        """Forget all recorded tensors."""
        for d in (self.inputs, self.output_grads, self.grad_calls):
            for v in d.values():
                v.clear()
        self._outputs.clear()

    def output_tensors(self) -> list[Tensor] | None:
        """The recorded layer outputs, to back-propagate extra passes *to* (no weight-gradient
        products); ``None`` if one was modified in place since (e.g. ``ReLU(inplace=True)``):
        then back-propagate to the weights instead, whose tensor hooks still fire."""
        if any(t._version != v for t, v in self._outputs):
            return None
        return [t for t, _ in self._outputs]

    def backward_targets(self) -> list[Tensor]:
        """What extra Fisher passes back-propagate to: :meth:`output_tensors` when usable, else
        the (distinct) weights of the captured layers."""
        return self.output_tensors() or list(
            {id(la.weight_param): la.weight_param for la in self.layers}.values())

    def drop_output_grads(self, start: int = 0) -> None:
        """Forget the output gradients recorded from entry ``start`` on (all layers)."""
        for name in self.output_grads:
            del self.output_grads[name][start:]
            del self.grad_calls[name][start:]

    # ------------------------------------------------------------------ per-layer views
    def calls(self, name: str) -> int:
        """How many times layer ``name`` was called in the recorded forward(s)."""
        return len(self.inputs[name])

    def layer_inputs(self, name: str) -> Tensor:
        """Expanded inputs of all calls of ``name`` as one ``(N, T_1 + … + T_R, fan_in)`` tensor.

        Example:
            >>> from curvlab.kfac.layers import find_layers
            >>> lin = nn.Linear(2, 2)
            >>> with FactorCapture(find_layers(nn.Sequential(lin))) as cap:
            ...     _ = lin(lin(torch.randn(3, 2)))       # shared weights: two calls
            >>> cap.calls("0"), tuple(cap.layer_inputs("0").shape)
            (2, (3, 2, 2))
        """
        xs = self.inputs[name]
        if not xs:
            raise RuntimeError(f"FactorCapture: layer {name!r} recorded no inputs")
        if len(xs) == 1:
            return xs[0]
        if len({x.shape[0] for x in xs}) != 1:
            raise ValueError(f"layer {name!r} was called {len(xs)} times with different batch "
                             f"sizes {[x.shape[0] for x in xs]}; K-FAC-expand over the calls "
                             "needs the same examples in every call")
        return torch.cat(xs, dim=1)

    def layer_output_grads(self, name: str, start: int = 0) -> list[Tensor]:
        """Output gradients of ``name`` per backward pass, from entry ``start`` on.

        With ``R`` calls each pass consists of ``R`` recorded gradients (one per call); they are
        concatenated along ``T`` in call order, matching :meth:`layer_inputs`.
        """
        r = max(1, len(self.inputs[name])) if self.record_inputs else 1
        return group_passes(name, self.output_grads[name][start:],
                            self.grad_calls[name][start:], r)

    def pop_output_grads(self, start: int) -> dict[str, tuple[list[Tensor], list[int]]]:
        """Remove and return ``{name: (gradients, calls)}`` recorded from entry ``start`` on."""
        out = {name: (gs[start:], self.grad_calls[name][start:])
               for name, gs in self.output_grads.items()}
        self.drop_output_grads(start)
        return out

    def verify(self) -> None:
        """Raise ``RuntimeError`` naming every layer that received no statistics.

        A layer whose forward hook never fired (e.g. its module is called functionally, like
        ``nn.MultiheadAttention.out_proj``) or whose output never received a gradient cannot get
        Kronecker factors.

        Example:
            >>> from curvlab.kfac.layers import find_layers
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> cap = FactorCapture(find_layers(net))
            >>> cap.verify()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            RuntimeError: K-FAC layers received no statistics: '0' (no forward inputs, ...
        """
        missing = []
        for layer in self.layers:
            what = []
            if self.record_inputs and not self.inputs[layer.name]:
                what.append("no forward inputs")
            if self.record_output_grads and not self.output_grads[layer.name]:
                what.append("no output gradients")
            if what:
                missing.append(f"{layer.name!r} ({', '.join(what)})")
        if missing:
            raise RuntimeError(
                "K-FAC layers received no statistics: " + ", ".join(missing)
                + ". Is the module called through its forward (hooks fire only on module "
                "calls), and does its output reach the loss? Exclude it with params=..."
            )

    @staticmethod
    def concat(tensors: list[Tensor]) -> Tensor:
        """Concatenate several recorded tensors along the example dimension."""
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)


def group_passes(name: str, gs: list[Tensor], cs: list[int], r: int) -> list[Tensor]:
    """Group recorded output gradients of a layer with ``r`` calls into backward passes.

    ``gs[i]`` came from call ``cs[i]``; each pass holds one gradient per call, returned
    concatenated along ``T`` in call order (K-FAC-expand, see the module docstring).
    """
    if r == 1:
        return list(gs)
    if len(gs) % r:
        raise RuntimeError(f"layer {name!r}: {len(gs)} output gradients for {r} calls; every "
                           "call's output must reach the loss in every backward pass")
    passes = []
    for k in range(0, len(gs), r):
        order = sorted(range(k, k + r), key=lambda i: cs[i])
        if [cs[i] for i in order] != list(range(r)):
            raise RuntimeError(f"layer {name!r}: backward pass {k // r} did not reach every "
                               "call's output once")
        passes.append(torch.cat([gs[i] for i in order], dim=1))
    return passes
