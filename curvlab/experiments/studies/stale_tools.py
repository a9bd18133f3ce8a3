"""Pieces of the stale-statistics study (SP-NGD / THOR): networks, refresh policies from
JSON-friendly specs, refresh bookkeeping and the block-split inverse error.

* :func:`stale_cnn` — the quick-mode BatchNorm CNN whose classifier ``nn.Linear`` has
  ``channels[-1]·(image_size/2)²`` inputs (512 on 8×8 digits), so that THOR's ``split_dim``
  values 32–256 give different splits; :func:`resnet18` — the CIFAR ResNet-18 of full mode.
* :func:`make_refresh` — a :mod:`curvlab.kfac.refresh` policy from a spec such as
  ``{"policy": "adaptive", "alpha": 0.1}`` (what a run config stores).
* :func:`refresh_fractions` — the fraction of possible factor updates and inverse refreshes a
  run performed; :func:`interval_grid` — the realized per-layer refresh interval at every step
  (for the heat map); :func:`split_errors` — relative Frobenius error of the split damped
  inverse applied to a gradient against the unsplit one, and the cost of applying it.

Example:
    >>> import torch
    >>> net = stale_cnn(generator=torch.Generator().manual_seed(0))
    >>> net(torch.zeros(2, 1, 8, 8)).shape, net[-1].in_features
    (torch.Size([2, 10]), 512)
    >>> make_refresh({"policy": "trace", "omega": 0.2})
    TraceRefresh(omega=0.2)
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from curvlab.kfac import (
    AdaptiveRefresh,
    FixedRefresh,
    FrequencyRefresh,
    KroneckerEngine,
    KroneckerFactors,
    RefreshPolicy,
    TraceRefresh,
)

__all__ = ["EVERY_STEP", "interval_grid", "make_refresh", "refresh_fractions", "resnet18",
           "split_errors", "stale_cnn"]

#: Spec of K-FAC refreshing statistics and inverses on every step.
EVERY_STEP: dict[str, Any] = {"policy": "fixed", "cov_interval": 1, "inv_interval": 1,
                              "num_forced_inverses": 0}


def stale_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
              channels: Sequence[int] = (16, 32), *,
              generator: torch.Generator | None = None) -> nn.Sequential:
    """``[conv3×3 (no bias) → BatchNorm2d → ReLU] × len(channels) → MaxPool2d(2) → Flatten →
    Linear`` (PyTorch default init, drawn from ``generator`` when given)."""
    if image_size < 2 or image_size % 2:
        raise ValueError(f"stale_cnn: image_size must be even and >= 2, got {image_size}")
    layers: list[nn.Module] = []
    prev = in_channels
    for c in channels:
        layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        prev = c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(prev * (image_size // 2) ** 2,
                                                         num_classes)]
    net = nn.Sequential(*layers)
    if generator is not None:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    bound = 1.0 / m.weight[0].numel() ** 0.5
                    m.weight.uniform_(-bound, bound, generator=generator)
                    if m.bias is not None:
                        m.bias.uniform_(-bound, bound, generator=generator)
    return net


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks, ``width``·(1, 2, 4, 8)
    channels, global average pool, ``Linear(8·width, num_classes)``; 11.2 M parameters at
    ``width=64``); no in-place ReLU (K-FAC's hooks)."""
    w = [width, 2 * width, 4 * width, 8 * width]
    blocks: list[nn.Module] = [nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(w[0]), nn.ReLU()]
    prev = w[0]
    for i, c in enumerate(w):
        blocks += [_BasicBlock(prev, c, 1 if i == 0 else 2), _BasicBlock(c, c, 1)]
        prev = c
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)]
    return nn.Sequential(*blocks)


class _AdaptiveRefresh(AdaptiveRefresh):
    """:class:`~curvlab.kfac.AdaptiveRefresh` whose similarity test also accepts the batched
    ``(U, d, d)`` factors of unit-wise BatchNorm blocks: they are compared as one ``(U·d, d)``
    matrix (the same Frobenius norm; the library's ``_fro`` takes a per-unit norm there)."""

    def observe_update(self, step, name, factor, old, new):
        if old is not None and old.dim() > 2:
            old, new = old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])
        super().observe_update(step, name, factor, old, new)


_POLICIES: dict[str, Callable[..., RefreshPolicy]] = {
    "fixed": FixedRefresh, "adaptive": _AdaptiveRefresh, "trace": TraceRefresh,
    "frequency": FrequencyRefresh}


def make_refresh(spec: Mapping[str, Any]) -> RefreshPolicy:
    """A fresh refresh policy from ``{"policy": name, **arguments}``, ``name`` in ``fixed``,
    ``adaptive``, ``trace``, ``frequency`` (:mod:`curvlab.kfac.refresh`).

    Example:
        >>> make_refresh(EVERY_STEP)
        FixedRefresh(cov_interval=1, inv_interval=1, num_forced_inverses=0)
    """
    args = dict(spec)
    name = args.pop("policy", None)
    if name not in _POLICIES:
        raise ValueError(f"make_refresh: policy must be one of {sorted(_POLICIES)}, got {name!r}")
    return _POLICIES[name](**args)


def refresh_fractions(policy: RefreshPolicy, steps: int) -> dict[str, float]:
    """``factor_refresh_fraction``: factor updates over ``steps ×`` factors (two per Kronecker
    layer, ``A`` and ``G``; one, ``F``, per unit-wise layer); ``inverse_refresh_fraction``:
    inverse refreshes over ``steps ×`` layers. Every-step K-FAC has 1 and 1.

    Example:
        >>> p = FixedRefresh(2, 4, 0)
        >>> p.bind(["fc"])
        >>> for k in range(8):
        ...     if p.stats_due(k, "fc")[0]:
        ...         p.observe_update(k, "fc", "A", None, torch.eye(2))
        ...         p.observe_update(k, "fc", "G", None, torch.eye(2))
        ...     if p.inverse_due(k, "fc", (), True):
        ...         p.observe_refresh(k, "fc", ())
        >>> refresh_fractions(p, 8)
        {'factor_refresh_fraction': 0.5, 'inverse_refresh_fraction': 0.25}
    """
    if steps < 1 or not policy.counts:
        return {"factor_refresh_fraction": float("nan"), "inverse_refresh_fraction": float("nan")}
    factors = sum(1 if n in policy.unitwise else 2 for n in policy.counts)
    done = sum(c["A"] + c["G"] + c["F"] for c in policy.counts.values())
    inverses = sum(c["inverse"] for c in policy.counts.values())
    return {"factor_refresh_fraction": done / (steps * factors),
            "inverse_refresh_fraction": inverses / (steps * len(policy.counts))}


def interval_grid(log: pd.DataFrame, steps: int, what: str = "inverse") -> pd.DataFrame:
    """Realized refresh interval of ``what`` per layer (rows) at every step (columns): a step in
    ``[r_i, r_{i+1})`` between consecutive refreshes gets ``r_{i+1} − r_i``; after the last
    refresh, the steps left. ``what="factor"`` uses ``A``/``G``/``F`` updates (their minimum).

    Example:
        >>> log = pd.DataFrame({"step": [0, 1, 3], "layer": "fc", "what": "inverse"})
        >>> interval_grid(log, 6).values.tolist()
        [[1.0, 2.0, 2.0, 3.0, 3.0, 3.0]]
    """
    kinds = {"A", "G", "F"} if what == "factor" else {what}
    rows = {}
    part = log[log["what"].isin(kinds)] if len(log) else log
    for layer, grp in part.groupby("layer", sort=False):
        marks = [*sorted(set(int(s) for s in grp["step"])), steps]
        row = [float("nan")] * steps
        for a, b in itertools.pairwise(marks):
            for s in range(a, min(b, steps)):
                row[s] = float(b - a)
        rows[str(layer)] = row
    order = sorted(rows, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    return pd.DataFrame.from_dict({n: rows[n] for n in order}, orient="index",
                                  columns=range(steps))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_errors(engine: KroneckerEngine, grads: Mapping[str, Tensor], damping: float,
                 split_dims: Sequence[int | None], *, repeats: int = 10) -> pd.DataFrame:
    """Per ``split_dim``: the engine's current Kronecker factors (dense) block-split, damped
    (``eigen``: Tikhonov on the product) and applied to ``grads`` (``{param name: gradient}``).

    Columns: ``split_dim`` (``None`` = unsplit), ``rel_error`` = ``‖P_k g − P g‖_F / ‖P g‖_F``
    over all Kronecker layers together (``P``: the unsplit damped inverse), ``precondition_ms``
    (median over ``repeats`` calls of ``engine.precondition``), ``refresh_ms`` (the
    eigendecompositions) and ``factors_bytes`` / ``inverses_bytes``. Unit-wise normalization
    blocks are not split and are left out. The engine's factors must be dense (unsplit).
    """
    factors = {}
    for la in engine.layers:
        block = engine.blocks[la.name]
        if not block.has_factors:
            continue
        if hasattr(block.A, "parts") or hasattr(block.G, "parts"):
            raise ValueError("split_errors: the engine's factors are already split; pass an "
                             "unsplit engine")
        factors[la.name] = KroneckerFactors(block.A, block.G, 1)
    layers = [la for la in engine.layers if la.name in factors]
    device = next(iter(grads.values())).device
    rows: dict[int | None, dict[str, Any]] = {}
    ref = None
    for k in [None, *[s for s in split_dims if s is not None]]:
        eng = KroneckerEngine(layers, fisher=engine.fisher, reduction=engine.reduction,
                              inverse=engine.inverse, split_dim=k, norm_layers=[])
        eng.set_factors(factors)
        _sync(device)
        t0 = time.perf_counter()
        eng.refresh()
        _sync(device)
        refresh_ms = 1e3 * (time.perf_counter() - t0)
        out = eng.precondition(grads, damping)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            eng.precondition(grads, damping)
            _sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
        vec = torch.cat([out[n].reshape(-1).double() for n in sorted(out)])
        if ref is None:
            ref = vec
        mem = eng.memory_bytes()
        rows[k] = {"split_dim": k, "rel_error": float((vec - ref).norm() / ref.norm()),
                   "precondition_ms": statistics.median(times), "refresh_ms": refresh_ms,
                   "factors_bytes": mem["factors"], "inverses_bytes": mem["inverses"]}
    return pd.DataFrame([rows[k] for k in split_dims])
