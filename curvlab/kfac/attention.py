r"""Capturing ``nn.MultiheadAttention``'s input projections for K-FAC.

``nn.MultiheadAttention`` applies its packed ``in_proj_weight`` functionally (inside
``F.multi_head_attention_forward``), so module hooks never see the query, key and value
projections. While a :class:`~curvlab.kfac.capture.FactorCapture` is active, the module's
``forward`` is replaced by :func:`attention_forward`: the same mathematics written with one
``F.linear`` per projection (rows ``j·E … (j+1)·E − 1`` of the module's own ``in_proj_weight``
and ``in_proj_bias``, so gradients still reach the module's parameters) whose inputs and outputs
are recorded like those of an ``nn.Linear``; ``out_proj`` is called as a module, so its ordinary
Linear hooks fire. Supported: packed projections (``kdim == vdim == embed_dim``), no
``bias_k``/``bias_v``, no ``add_zero_attn``; ``attn_mask`` (bool or additive, ``(L, S)`` or
``(N·H, L, S)``), ``key_padding_mask``, ``need_weights``/``average_attn_weights``, dropout on the
attention weights, ``batch_first`` either way, unbatched inputs. Outside a capture the module is
untouched (PyTorch's fused kernels run as usual); inside one the explicit softmax attention runs,
equal up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention_forward"]


def attention_forward(module: nn.MultiheadAttention,
                      record: Callable[[int, Tensor, Tensor], None]) -> Callable[..., Any]:
    """A replacement ``forward`` for ``module`` calling ``record(j, x, y)`` for projection ``j``
    (0 query, 1 key, 2 value) with its input ``x`` and output ``y``."""

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("nn.MultiheadAttention: is_causal needs attn_mask (as in PyTorch)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if module.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) layout from here, as PyTorch's functional implementation
        e, h = module.embed_dim, module.num_heads
        w, b = module.in_proj_weight, module.in_proj_bias
        projected = []
        for j, x in enumerate((query, key, value)):
            xb = x.transpose(0, 1)  # (N, L, E): examples first for the recorded statistics
            y = F.linear(xb, w[j * e:(j + 1) * e], None if b is None else b[j * e:(j + 1) * e])
            record(j, xb, y)
            projected.append(y)
        q, k, v = projected  # (N, L|S, E)
        n, length, _ = q.shape
        s_len, hd = k.shape[1], e // h
        q = q.reshape(n, length, h, hd).transpose(1, 2)
        k = k.reshape(n, s_len, h, hd).transpose(1, 2)
        v = v.reshape(n, s_len, h, hd).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (N, H, L, S)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, h, length, s_len)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool \
                else scores + kpm
        attn = torch.softmax(scores, dim=-1)
        if module.training and module.dropout > 0:
            attn = F.dropout(attn, module.dropout)
        out = (attn @ v).transpose(1, 2).reshape(n, length, e)
        out = module.out_proj(out)  # a Linear module: its own hooks fire
        if not module.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    return forward
