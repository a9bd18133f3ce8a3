"""A small causal (GPT-style) transformer language model, built from plain layers.

:func:`causal_transformer` returns a :class:`CausalTransformer`: token + learned positional
embedding, ``depth`` pre-LN blocks ``h + attn(LN(h))`` then ``h + MLP(LN(h))`` (MLP
``Linear(d, r·d) → GELU → Linear(r·d, d)``), a final LayerNorm and a tied (``tok.weight``) or
untied (``nn.Linear``) output head.

Attention is :class:`CausalSelfAttention`: four ``nn.Linear`` projections (``q``, ``k``, ``v``,
``out``) around an explicit ``softmax(q kᵀ/√d_head + causal mask) v`` written with matmuls,
so that K-FAC sees every projection as an ``nn.Linear`` on ``(N, S, d)`` inputs, the model is
``torch.fx``-traceable (fixed-size position and mask buffers, sliced to the sequence length), and
forward-mode AD runs through it (no fused kernel).

Conventions: inputs are ``int64`` token ids ``(N, S)`` with ``S <= context``; outputs are logits
in PyTorch's cross-entropy layout ``(N, V, S)`` (``layout="ncs"``, targets ``(N, S)``, so
``nn.CrossEntropyLoss(ignore_index=-100)`` averages over the non-ignored positions) or flattened
``(N·S, V)`` (``layout="flat"``, targets ``(N·S,)``). Initialization is GPT-2's: weights
``N(0, 0.02²)``, biases zero, LayerNorm ``(1, 0)``, residual output projections scaled by
``1/√(2·depth)``; all draws come from ``generator`` when one is given.

:func:`parameter_blocks` groups parameter names into ``embedding``, ``attention``, ``mlp``,
``layernorm`` and ``head`` (per-block curvature).

Example:
    >>> import torch
    >>> net = causal_transformer(vocab_size=11, context=8, width=16, depth=2, heads=2,
    ...                          generator=torch.Generator().manual_seed(0))
    >>> net(torch.zeros(3, 8, dtype=torch.long)).shape
    torch.Size([3, 11, 8])
    >>> sorted(parameter_blocks(net))
    ['attention', 'embedding', 'head', 'layernorm', 'mlp']
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BLOCK_NAMES",
    "CausalSelfAttention",
    "CausalTransformer",
    "TransformerBlock",
    "block_of",
    "causal_transformer",
    "parameter_blocks",
]

#: Parameter groups of :func:`parameter_blocks`, in display order.
BLOCK_NAMES: tuple[str, ...] = ("embedding", "attention", "mlp", "layernorm", "head")


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"causal_transformer: {name} must be a positive int, got {value!r}")
    return value


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from four ``nn.Linear`` projections (see module doc).

    Example:
        >>> attn = CausalSelfAttention(8, 2, context=4)
        >>> attn(torch.randn(2, 4, 8)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(
                f"CausalSelfAttention: width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, s, d = x.shape
        q = self.q(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = self.mask.narrow(0, 0, s).narrow(1, 0, s)  # narrow, not [:s]: fx-traceable
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(y.transpose(1, 2).reshape(n, s, d))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``h + attn(ln1(h))`` then ``h + mlp(ln2(h))``.

    Example:
        >>> TransformerBlock(8, 2, context=4, mlp_ratio=2)(torch.randn(1, 3, 8)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, width: int, heads: int, context: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class CausalTransformer(nn.Module):
    """Token + positional embedding, pre-LN blocks, final LayerNorm, LM head (module doc).

    Built by :func:`causal_transformer` (which also initializes it).

    Example:
        >>> CausalTransformer(7, 5, width=8, depth=1, heads=2, layout="flat")(
        ...     torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([10, 7])
    """

    def __init__(self, vocab_size: int, context: int, width: int, depth: int, heads: int,
                 mlp_ratio: int = 4, tied: bool = False, layout: str = "ncs") -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("width", width),
                            ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            _check_positive(value, name)
        if layout not in ("ncs", "flat"):
            raise ValueError(f"causal_transformer: layout must be 'ncs' or 'flat', got {layout!r}")
        self.vocab_size, self.context, self.layout, self.tied = vocab_size, context, layout, tied
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, context, mlp_ratio)
                                      for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = None if tied else nn.Linear(width, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        s = idx.shape[1]
        h = self.tok(idx) + self.pos(self.positions.narrow(0, 0, s))
        h = self.ln_f(self.blocks(h))
        logits = F.linear(h, self.tok.weight) if self.head is None else self.head(h)
        if self.layout == "flat":
            return logits.flatten(0, 1)
        return logits.transpose(1, 2)


def _init_(model: CausalTransformer, depth: int, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("attn.out", "mlp.2")) else 0.02
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def causal_transformer(vocab_size: int, context: int, *, width: int = 64, depth: int = 2,
                       heads: int = 4, mlp_ratio: int = 4, tied: bool = False,
                       layout: str = "ncs",
                       generator: torch.Generator | None = None) -> CausalTransformer:
    """Build a :class:`CausalTransformer` with GPT-2 initialization (see the module docstring).

    Args:
        vocab_size: Number of token ids ``V``.
        context: Longest sequence ``S`` (positions and mask buffers have this size).
        width: Model width ``d`` (divisible by ``heads``).
        depth: Number of blocks.
        heads: Attention heads.
        mlp_ratio: Hidden width of the MLP is ``mlp_ratio · d``.
        tied: Output head reuses the token embedding (no ``head`` parameters).
        layout: ``"ncs"`` → logits ``(N, V, S)``; ``"flat"`` → ``(N·S, V)``.
        generator: Source of all initial draws (``None``: torch's global RNG).

    Example:
        >>> net = causal_transformer(7, 5, width=8, depth=1, heads=2, tied=True)
        >>> net.head is None, net(torch.zeros(2, 3, dtype=torch.long)).shape
        (True, torch.Size([2, 7, 3]))
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"causal_transformer: generator must be a torch.Generator, "
                        f"got {type(generator).__name__}")
    model = CausalTransformer(vocab_size, context, width, depth, heads, mlp_ratio, tied, layout)
    _init_(model, depth, generator)
    return model


def block_of(name: str) -> str:
    """The :data:`BLOCK_NAMES` group of a :class:`CausalTransformer` parameter name.

    Example:
        >>> block_of("blocks.0.attn.q.weight"), block_of("ln_f.bias"), block_of("tok.weight")
        ('attention', 'layernorm', 'embedding')
    """
    if name.startswith(("tok.", "pos.")):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if ".ln" in name or name.startswith("ln_f."):
        return "layernorm"
    raise ValueError(f"block_of: parameter {name!r} is not part of a CausalTransformer")


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """``{block: [parameter names]}`` of the trainable parameters, in :data:`BLOCK_NAMES` order
    (a tied model has no ``head`` entry).

    Example:
        >>> net = causal_transformer(7, 5, width=8, depth=1, heads=2, tied=True)
        >>> parameter_blocks(net)["embedding"], "head" in parameter_blocks(net)
        (['tok.weight', 'pos.weight'], False)
    """
    blocks: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            blocks.setdefault(block_of(name), []).append(name)
    return {b: blocks[b] for b in BLOCK_NAMES if b in blocks}
