r"""Kronecker-factored curvature state shared by :class:`~curvlab.optim.KFAC` and
:class:`~curvlab.optim.preconditioner.KFACPreconditioner` (private).

Conventions (spec ``kfac.md`` §0, matching ``curvlab``'s GGN scale):

* Layer ``s = W ā`` with ``ā = [a; 1]`` when the layer has a (selected) bias. Gradient in matrix
  form ``V = [∇W | ∇b]`` of shape ``out × (in + 1)`` (conv weights flattened to
  ``out × (C·kh·kw)``, the ``F.unfold`` order).
* ``A = (1/N) Σ_{n,t} ā_{nt} ā_{nt}ᵀ`` (mean over examples, sum over locations ``t``);
  ``G = (1/T) Σ_{n,t} g_{nt} g_{nt}ᵀ`` with ``g`` the back-propagated derivative of the
  *reduced* loss (so it already carries the loss scale ``c``, e.g. ``1/N`` for ``'mean'``); one
  term per Monte-Carlo sample (divided by the number of samples) or per square-root column
  (type-2). For the empirical Fisher the sum is multiplied by ``N`` (``'mean'`` reduction): the
  back-propagated derivative of a mean loss is ``g̃_n / N``. With these, ``A ⊗ G`` is exactly the
  GGN block whenever ``G_n`` is the same for all examples (e.g. any single layer of a deep linear
  network with squared error).
* In curvlab's flat order *inside the matrix* ``V`` (row-major) the block is ``G ⊗ A``:
  ``(G ⊗ A) vec_r(V) = vec_r(G V A)``.
* Factors are stored in float32 (float64 when the parameters are float64), computed with
  autocast disabled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KFACCurvature",
    "LayerInfo",
    "OutputCapture",
    "find_kfac_layers",
]


@dataclass
class LayerInfo:
    """A supported layer: module, its kind and the selected parameter names it owns."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: str
    bias: str | None


def _supported(mod: nn.Module) -> str | None:
    if type(mod) is nn.Linear:
        return "linear"
    if type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros" \
            and isinstance(mod.padding, tuple):
        return "conv2d"
    return None


def find_kfac_layers(
    model: nn.Module, selected: Mapping[str, Tensor]
) -> tuple[list[LayerInfo], list[str]]:
    """Supported layers (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``, zero padding) whose
    weight is selected, and the names of all other selected parameters (unsupported)."""
    by_id = {id(p): n for n, p in selected.items()}
    layers: list[LayerInfo] = []
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        kind = _supported(mod)
        if kind is None or id(mod.weight) not in by_id:
            continue
        w = by_id[id(mod.weight)]
        if w in covered:  # the same module registered twice (shared) -> keep the first
            continue
        b = by_id.get(id(mod.bias)) if mod.bias is not None else None
        layers.append(LayerInfo(mname or type(mod).__name__, mod, kind, w, b))
        covered.update([w] if b is None else [w, b])
    unsupported = [n for n in selected if n not in covered]
    return layers, unsupported


def _factor_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def input_rows(layer: LayerInfo, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``ā`` rows ``(N·T, d_in [+1])`` of a layer input (conv: im2col patches)."""
    mod = layer.module
    if layer.kind == "conv2d":
        x = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, CK, L)
        rows = x.transpose(1, 2).reshape(-1, x.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.to(dtype)
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def output_rows(layer: LayerInfo, g: Tensor, dtype: torch.dtype) -> Tensor:
    """Output-derivative rows ``(N·T, d_out)``."""
    if layer.kind == "conv2d":
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]).to(dtype)
    return g.reshape(-1, g.shape[-1]).to(dtype)


def grad_matrix(layer: LayerInfo, gw: Tensor, gb: Tensor | None) -> Tensor:
    """``V = [∇W | ∇b]`` (``out × (in [+1])``)."""
    v = gw.reshape(gw.shape[0], -1)
    if layer.bias is not None:
        v = torch.cat([v, gb.reshape(-1, 1)], dim=1)
    return v


def split_matrix(layer: LayerInfo, v: Tensor, wshape: torch.Size) -> tuple[Tensor, Tensor | None]:
    if layer.bias is not None:
        return v[:, :-1].reshape(wshape), v[:, -1].contiguous()
    return v.reshape(wshape), None


class OutputCapture:
    """Forward hooks storing each supported layer's input (detached) and output (with graph).

    While :attr:`active`, every call of a registered module in training mode appends to
    ``inputs[name]`` / ``outputs[name]``. Output derivatives are obtained afterwards with
    ``torch.autograd.grad(..., outputs)`` (only the paths to the layer outputs are
    back-propagated). An output modified in place after the layer (e.g. ``ReLU(inplace=True)``)
    would give derivatives of the wrong tensor; this is detected through the version counter.
    """

    def __init__(self, layers: Sequence[LayerInfo], *, keep_outputs: bool = True,
                 grad_hook: Any = None) -> None:
        self.layers = list(layers)
        self.active = False
        self.keep_outputs = keep_outputs
        self.grad_hook = grad_hook  # optional fn(layer_name, grad) for tensor hooks
        self.inputs: dict[str, list[Tensor]] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self._versions: dict[str, list[int]] = {}
        self._handles = [
            layer.module.register_forward_hook(self._make_hook(layer.name))
            for layer in self.layers
        ]

    def _make_hook(self, name: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if not self.active or not mod.training or not torch.is_grad_enabled():
                return
            self.inputs.setdefault(name, []).append(args[0].detach())
            if self.keep_outputs:
                self.outputs.setdefault(name, []).append(out)
                self._versions.setdefault(name, []).append(out._version)
            if self.grad_hook is not None and out.requires_grad:
                out.register_hook(lambda g, _n=name: self.grad_hook(_n, g))

        return hook

    def check_inplace(self) -> None:
        for name, outs in self.outputs.items():
            for out, ver in zip(outs, self._versions[name], strict=True):
                if out._version != ver:
                    raise RuntimeError(
                        f"K-FAC: the output of layer {name!r} was modified in place after the "
                        "layer (e.g. ReLU(inplace=True)); output derivatives would be wrong. "
                        "Use out-of-place activations."
                    )

    def clear(self) -> None:
        self.inputs = {}
        self.outputs = {}
        self._versions = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def safe_eigh(x: Tensor, what: str) -> tuple[Tensor, Tensor] | None:
    """Guarded eigendecomposition: symmetrize, NaN check, float64 retry, eigenvalues >= 0.

    Returns ``None`` (after a warning) when no decomposition could be computed.
    """
    x = 0.5 * (x + x.mT)
    if not bool(torch.isfinite(x).all()):
        warnings.warn(f"K-FAC: factor {what} has non-finite entries; keeping the previous "
                      "inverse", RuntimeWarning, stacklevel=4)
        return None
    for dtype in (x.dtype, torch.float64):
        try:
            d, q = torch.linalg.eigh(x.to(dtype))
        except RuntimeError:
            continue
        if bool(torch.isfinite(d).all()) and bool(torch.isfinite(q).all()):
            return d.clamp_min(0.0).to(x.dtype), q.to(x.dtype)
    warnings.warn(f"K-FAC: eigendecomposition of factor {what} failed (also in float64); "
                  "keeping the previous inverse", RuntimeWarning, stacklevel=4)
    return None


class KFACCurvature:
    r"""Per-layer Kronecker factors (EMA), their eigendecompositions, and preconditioning.

    ``inverse='eigen'``: :math:`(G \otimes A + \lambda I)^{-1}` exactly (Tikhonov on the
    product), ``Q_G[(Q_G^T V Q_A) ⊘ (d_G d_A^T + λ)]Q_A^T``. ``inverse='factored'``:
    π-adjusted factored Tikhonov :math:`(G + \tfrac{\sqrt\lambda}{\pi} I)^{-1} V (A + \pi
    \sqrt\lambda I)^{-1}`, :math:`\pi = \sqrt{(\operatorname{tr}A/\dim A)/(\operatorname{tr}G/
    \dim G)}` (1 when a trace is 0). ``ekfac=True`` replaces ``d_G d_A^T`` by the EKFAC scalings
    (second moments of per-example gradients in the Kronecker eigenbasis).
    """

    def __init__(self, layers: Sequence[LayerInfo], *, ema_decay: float, inverse: str,
                 ekfac: bool) -> None:
        if inverse not in ("eigen", "factored"):
            raise ValueError(f"inverse must be 'eigen' or 'factored', got {inverse!r}")
        if ekfac and inverse != "eigen":
            raise ValueError("ekfac=True needs inverse='eigen' (scalings live in the eigenbasis)")
        self.layers = list(layers)
        self.ema_decay = ema_decay
        self.inverse = inverse
        self.ekfac = ekfac
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # dA, QA, dG, QG
        self.scale: dict[str, Tensor] = {}  # EKFAC scalings (out x in)
        self.scale_new: dict[str, Tensor] = {}
        self.updates = 0  # number of EMA updates (k of the warm start)
        self.dirty = False

    # ---- statistics --------------------------------------------------------------------
    def ema_weight(self) -> float:
        """``ε_k = min(1 − 1/k, ema_decay)`` for the next update (k counts updates)."""
        k = self.updates + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    def update(self, new_A: Mapping[str, Tensor], new_G: Mapping[str, Tensor]) -> None:
        eps = self.ema_weight()
        for name, a in new_A.items():
            g = new_G[name]
            if name in self.A and eps > 0.0:
                self.A[name] = eps * self.A[name] + (1.0 - eps) * a
                self.G[name] = eps * self.G[name] + (1.0 - eps) * g
            else:
                self.A[name], self.G[name] = a.clone(), g.clone()
            self.A[name] = 0.5 * (self.A[name] + self.A[name].mT)
            self.G[name] = 0.5 * (self.G[name] + self.G[name].mT)
        self.updates += 1
        self.dirty = True

    def update_scale(self, new_scale: Mapping[str, Tensor]) -> None:
        """EMA of the EKFAC scalings (same warm start, its own counter via ``scale_updates``)."""
        eps = self.ema_weight_scale()
        for name, s in new_scale.items():
            if name in self.scale and eps > 0.0:
                self.scale[name] = eps * self.scale[name] + (1.0 - eps) * s
            else:
                self.scale[name] = s.clone()
        self.scale_updates = getattr(self, "scale_updates", 0) + 1

    def ema_weight_scale(self) -> float:
        k = getattr(self, "scale_updates", 0) + 1
        return min(1.0 - 1.0 / k, self.ema_decay)

    # ---- inverses ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute the eigendecompositions of all factors (failures keep the last good one)."""
        for layer in self.layers:
            name = layer.name
            if name not in self.A:
                continue
            ea = safe_eigh(self.A[name], f"A of {name!r}")
            eg = safe_eigh(self.G[name], f"G of {name!r}")
            if ea is None or eg is None:
                continue
            self.eig[name] = (ea[0], ea[1], eg[0], eg[1])
            if self.ekfac:
                # new basis: restart the scalings from the K-FAC eigenvalues
                self.scale[name] = torch.outer(eg[0], ea[0])
                self.scale_updates = 0
        self.dirty = False

    def precondition(self, layer: LayerInfo, v: Tensor, damping: float) -> Tensor:
        """Apply the damped inverse block to ``V`` (matrix form, any float dtype)."""
        dA, QA, dG, QG = self.eig[layer.name]
        vf = v.to(QA.dtype)
        t = QG.mT @ vf @ QA
        if self.inverse == "eigen":
            denom = self.scale[layer.name] if self.ekfac else torch.outer(dG, dA)
            t = t / (denom + damping)
        else:
            ta, tg = float(dA.sum()) / dA.numel(), float(dG.sum()) / dG.numel()
            pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
            root = math.sqrt(damping)
            t = t / torch.outer(dG + root / pi, dA + pi * root)
        return (QG @ t @ QA.mT).to(v.dtype)

    def ekfac_scale(self, layer: LayerInfo, a_rows: Tensor, g_rows: Tensor, n: int,
                    weight: float) -> Tensor | None:
        r"""New EKFAC scalings ``S_{ij} = w Σ_n (Q_G^T D_n Q_A)_{ij}^2`` from per-example
        gradients ``D_n = Σ_t g_{nt} ā_{nt}^T`` (``w`` carries the Fisher's scale)."""
        if layer.name not in self.eig:
            return None
        dA, QA, dG, QG = self.eig[layer.name]
        a = (a_rows.to(QA.dtype) @ QA).reshape(n, -1, QA.shape[0])
        g = (g_rows.to(QG.dtype) @ QG).reshape(n, -1, QG.shape[0])
        if a.shape[1] == 1:
            return weight * (g[:, 0].square().mT @ a[:, 0].square())
        d = torch.einsum("nto,nti->noi", g, a)
        return weight * d.square().sum(0)

    # ---- state ----------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        def size(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        factors = size(list(self.A.values()) + list(self.G.values()))
        inverses = size([t for e in self.eig.values() for t in e]) + size(self.scale.values())
        return {"factors": factors, "inverses": inverses, "total": factors + inverses}

    def state_dict(self) -> dict[str, Any]:
        return {
            "A": {k: v.clone() for k, v in self.A.items()},
            "G": {k: v.clone() for k, v in self.G.items()},
            "eig": {k: tuple(t.clone() for t in v) for k, v in self.eig.items()},
            "scale": {k: v.clone() for k, v in self.scale.items()},
            "updates": self.updates,
            "scale_updates": getattr(self, "scale_updates", 0),
            "dirty": self.dirty,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = {layer.name for layer in self.layers}
        unknown = set(state["A"]) - names
        if unknown:
            raise ValueError(f"K-FAC state has factors for unknown layers {sorted(unknown)}; "
                             f"this optimizer's layers are {sorted(names)}")
        self.A = {k: v.clone() for k, v in state["A"].items()}
        self.G = {k: v.clone() for k, v in state["G"].items()}
        self.eig = {k: tuple(t.clone() for t in v) for k, v in state["eig"].items()}
        self.scale = {k: v.clone() for k, v in state["scale"].items()}
        self.updates = int(state["updates"])
        self.scale_updates = int(state["scale_updates"])
        self.dirty = bool(state["dirty"])


def layer_statistics(
    layer: LayerInfo,
    inputs: Sequence[Tensor],
    out_grads: Sequence[Sequence[Tensor]],
    *,
    num_examples: int,
    grad_scale: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""New ``A``, ``G`` of one layer and the concatenated rows.

    ``inputs``: the layer inputs of each call; ``out_grads[j]``: for each back-propagated
    vector ``j`` (a Monte-Carlo sample or a square-root column), the output derivatives of each
    call. ``grad_scale`` multiplies ``G`` (``1/mc_samples``, ``N`` for the empirical Fisher of a
    mean loss, 1 otherwise).
    """
    a_rows = torch.cat([input_rows(layer, x, dtype) for x in inputs])
    A = a_rows.mT @ a_rows / num_examples
    t = a_rows.shape[0] / num_examples  # locations per example
    g_rows = torch.stack(
        [torch.cat([output_rows(layer, g, dtype) for g in gs]) for gs in out_grads]
    )  # (J, N·T, out)
    G = torch.einsum("jro,jrp->op", g_rows, g_rows) * (grad_scale / t)
    return A, G, a_rows, g_rows
