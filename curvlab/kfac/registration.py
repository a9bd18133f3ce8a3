"""The one registration policy of every K-FAC entry point (:func:`register_layers`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from curvlab.kfac.layers import LayerTable, find_layers
from curvlab.kfac.unitwise import NORM_TYPES, find_norm_layers

__all__ = ["register_layers"]


def register_layers(
    model: nn.Module, selected: Mapping[str, Tensor] | Sequence[str], *, strict: bool, who: str,
    fallback: str = "", unitwise: bool = True,
) -> LayerTable:
    """The one registration policy of every K-FAC entry point.

    ``nn.Linear`` and ``nn.Conv2d`` layers are registered (grouped convolutions as one block per
    group); with ``unitwise=True`` (default) the affine parameters of BatchNorm, LayerNorm and
    GroupNorm get SP-NGD's unit-wise blocks (``table.norm``, :mod:`curvlab.kfac.unitwise`).
    Selected parameters of any other module get no block: one warning names
    them (``strict=True`` raises ``ValueError`` instead); what that means is each entry point's
    documented fallback (the operator is zero there, the optimizer and the preconditioner pass
    the gradient through), stated in the warning by ``fallback``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.PReLU())
        >>> table = register_layers(net, dict(net.named_parameters()), strict=True,
        ...                         who="demo", unitwise=True)  # doctest: +SKIP
        >>> register_layers(net, dict(net.named_parameters()), strict=True, who="demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: K-FAC does not support these modules/parameters: 2 (PReLU: no Kronecker-factored rule for this module type): 2.weight; exclude them with params= or pass strict=False
    """  # noqa: E501
    names = list(selected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = find_layers(model, names, strict=False, grouped_conv=True)
    if unitwise:
        modules = dict(model.named_modules())
        norm_mods = [m for m in table.unsupported if isinstance(modules.get(m), NORM_TYPES)]
        by_id = {id(p): n for n, p in model.named_parameters() if n in set(names)}
        table.norm = [la for la in find_norm_layers(model, by_id) if la.name in norm_mods]
        for la in table.norm:
            rest = [n for n in table.unsupported[la.name] if n not in la.param_names]
            if rest:
                table.unsupported[la.name] = rest
            else:
                del table.unsupported[la.name]
                table.reasons.pop(la.name, None)
    if table.unsupported:
        detail = "; ".join(f"{m or '<root>'} ({table.reasons.get(m, '?')}): {', '.join(ps)}"
                           for m, ps in table.unsupported.items())
        if strict:
            raise ValueError(f"{who}: K-FAC does not support these modules/parameters: {detail}"
                             "; exclude them with params= or pass strict=False")
        warnings.warn(f"{who}: no Kronecker-factored block for {detail}"
                      + (f"; {fallback}" if fallback else ""), UserWarning, stacklevel=3)
    return table
