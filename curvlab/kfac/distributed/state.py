"""Helpers of distributed K-FAC: layer slices of gradients, merged checkpoints and policies.

A layer's part of a parameter-shaped gradient is the whole weight (and bias), or for one group
of a grouped convolution its output rows ``layer.out_slice``. Checkpoints are assembled from
each layer's owner (inverse worker), so every rank returns the same full engine state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from curvlab.kfac.layers import KFACLayer

if TYPE_CHECKING:
    from curvlab.kfac.distributed.runtime import DistributedKFAC

__all__ = ["gather_engine_state", "layer_parts", "merge_policy", "set_layer_parts"]


def _names(layer: KFACLayer) -> list[str]:
    return [p for p in (layer.weight, layer.bias) if p is not None]


def layer_parts(layer: KFACLayer, values: Mapping[str, Tensor],
                fallback: Mapping[str, Tensor]) -> list[Tensor]:
    """``layer``'s parts (weight, bias) of ``values`` (or of ``fallback`` where missing)."""
    out = []
    for p in _names(layer):
        t = values[p] if p in values else fallback[p]
        out.append((t if layer.group is None else t[layer.out_slice]).contiguous())
    return out


def set_layer_parts(layer: KFACLayer, values: dict[str, Tensor], fallback: Mapping[str, Tensor],
                    parts: Sequence[Tensor]) -> None:
    """Write ``parts`` (from :func:`layer_parts`) into ``values`` in place."""
    for p, part in zip(_names(layer), parts, strict=True):
        if layer.group is None:
            values[p] = part.reshape(fallback[p].shape)
            continue
        if p not in values:
            values[p] = fallback[p].clone()
        values[p][layer.out_slice] = part.reshape(values[p][layer.out_slice].shape)


def merge_policy(states: Sequence[Mapping[str, Any]], owner: Mapping[str, int]) -> dict[str, Any]:
    """One refresh-policy state from every rank's: per-layer entries and log rows from each
    layer's owner (log rows ordered by step).

    Example:
        >>> s0 = {"type": "P", "counts": {"a": 1, "b": 0}, "refresh_log": [{"step": 0, "layer": "a"}]}
        >>> s1 = {"type": "P", "counts": {"a": 0, "b": 2}, "refresh_log": [{"step": 0, "layer": "b"}]}
        >>> m = merge_policy([s0, s1], {"a": 0, "b": 1})
        >>> m["counts"], [r["layer"] for r in m["refresh_log"]]
        ({'a': 1, 'b': 2}, ['a', 'b'])
    """  # noqa: E501
    layers = set(owner)
    out = dict(states[0])
    for key in states[0]:
        vals = [s[key] for s in states]
        if key == "refresh_log":
            rows = [dict(row) for r, s in enumerate(states) for row in s[key]
                    if owner.get(row["layer"]) == r]
            out[key] = sorted(rows, key=lambda row: row["step"])
        elif all(isinstance(v, dict) and set(v) <= layers for v in vals) and any(vals):
            out[key] = {n: states[owner[n]][key][n] for n in owner if n in states[owner[n]][key]}
    return out


def gather_engine_state(d: DistributedKFAC) -> dict[str, Any]:
    """The full engine state assembled from the layers' owners (collective)."""
    eng = d.engine
    st = eng.state_dict()
    if d.mode == "kaisa" and len(d.assignment.columns) == 1:
        return st  # COMM-OPT: everything is replicated
    mine = d.owned_layers()
    spngd = d.mode == "sp-ngd"
    parts = d.comm.all_gather_object((
        {n: eng.blocks[n].state_dict() for n in mine},
        {n: dict(eng.layer_counters[n]) for n in mine},
        eng.policy.state_dict() if spngd else None))
    for blocks, counters, _ in parts:
        st["blocks"].update(blocks)
        if spngd:
            st["layer_counters"].update(counters)
    if spngd:
        st["policy"] = merge_policy([p for _, _, p in parts], d.assignment.inverse_worker)
    return st
