"""Model and loss cases shared by the product, linearization and operator tests (float64).

* :func:`make_model` -- MLPs, CNNs, BatchNorm (train/eval), residual blocks, a sequence model
  with ``(N, C, S)`` outputs; each call is seeded, so equal kinds give equal models.
* :func:`make_loss`, :func:`make_targets`, :func:`make_data` -- CE/MSE/BCE with mean/sum, and
  batches of matching targets.
* The LM zoo (:func:`make_lm`, :data:`LM_KINDS`, :func:`lm_batch`): token embedding +
  positional embedding, a pre-LN causal self-attention block, an MLP block, tied input/output
  embeddings; integer token inputs, ``(N, V, S)`` or flattened ``(N*S, V)`` logits, targets
  padded with ``-100``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.func.params import cloned_buffers

DT = torch.float64


class Residual(nn.Module):
    """Residual block with functional ops in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.hidden = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + F.relu(self.hidden(h)) * 0.5
        return self.out(h.sigmoid() * h)


class ResidualCat(nn.Module):
    """Residual block with subtraction, concatenation, slicing and ``exp`` (generic tangents)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + F.relu(self.b(h)) * 0.5 - 0.1 * h
        h = torch.cat([h.sigmoid() * h, h[:, :1].exp()], dim=1)[:, :5]
        return self.c(h.reshape(h.shape[0], -1))


def make_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, input shape without the batch dim)``, float64, seeded."""
    torch.manual_seed(0)
    if kind == "mlp_tanh":
        m, shape = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)
    elif kind == "mlp_relu":
        m, shape = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), (4,)
    elif kind == "mlp_sigmoid":
        m, shape = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)), (4,)
    elif kind == "cnn":
        m = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        )
        shape = (1, 6, 6)
    elif kind == "cnn_bn_train":
        m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(2, 2, 1), nn.AvgPool2d(3), nn.Flatten(),
                          nn.Linear(2, 3))
        shape = (1, 6, 6)
    elif kind in ("bn_train", "bn_eval"):
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        shape = (4,)
        with torch.no_grad():
            m[1].running_mean.normal_()
            m[1].running_var.uniform_(0.5, 2.0)
            m[1].weight.normal_()
            m[1].bias.normal_()
        m.train(kind == "bn_train")
    elif kind == "bn_eval_leaky":
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.LeakyReLU(0.1),
                          nn.Linear(5, 3)).eval()
        with torch.no_grad():
            m[1].running_mean.normal_()
            m[1].running_var.uniform_(0.5, 2)
        shape = (4,)
    elif kind == "residual":
        m, shape = Residual(), (4,)
    elif kind == "residual_cat":
        m, shape = ResidualCat(), (4,)
    elif kind == "seq":  # outputs (N, C, d) for cross-entropy over positions
        m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 3, 1))
        shape = (2, 5)
    elif kind == "seq_linear":  # (N, C, S) outputs, linear in its parameters
        m, shape = nn.Sequential(nn.Tanh(), nn.Conv1d(2, 3, 1)), (2, 5)
    else:  # pragma: no cover
        raise ValueError(kind)
    return m.to(DT), shape


def make_targets(loss: str, out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        c = out.shape[1]
        return torch.randint(0, c, (out.shape[0], *out.shape[2:]), generator=g)
    if loss == "mse":
        return torch.randn(out.shape, generator=g, dtype=DT)
    return torch.rand(out.shape, generator=g, dtype=DT)


def make_loss(loss: str, reduction: str) -> nn.Module:
    cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss]
    return cls(reduction=reduction)


def make_data(model, shape, loss, sizes=(3, 5), seed=1):
    """Batches ``[(x, y), ...]`` of the given sizes with targets fitting ``loss``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        x = torch.randn((n, *shape), generator=g, dtype=DT)
        with torch.no_grad():
            out = torch.func.functional_call(model, ({}, cloned_buffers(model)), (x,))
        batches.append((x, make_targets(loss, out, g)))
    return batches


# ------------------------------------------------------------------------------------------
# LM zoo: integer tokens (N, S) -> logits

VOCAB, CONTEXT, WIDTH, HEADS = 7, 5, 4, 2


class TinyLM(nn.Module):
    """Token + positional embedding, optional pre-LN causal attention / MLP blocks, LM head.

    ``tied`` reuses the token embedding as output projection. ``layout='ncs'`` returns
    ``(N, V, S)`` logits (PyTorch's layout for cross-entropy over positions), ``'flat'`` returns
    ``(N*S, V)`` (``logits.flatten(0, 1)``; targets then ``(N*S,)``). Sequences have the fixed
    length ``CONTEXT`` (positions and the causal mask are buffers, so ``torch.fx`` traces it).
    """

    def __init__(self, attention: bool = True, mlp: bool = True, tied: bool = False,
                 layout: str = "ncs") -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        self.register_buffer("positions", torch.arange(CONTEXT))
        self.register_buffer(
            "causal", torch.triu(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool), diagonal=1)
        )
        self.ln1 = nn.LayerNorm(WIDTH) if attention else None
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True) if attention else None
        self.ln2 = nn.LayerNorm(WIDTH) if mlp else None
        self.mlp = (
            nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
            if mlp else None
        )
        self.ln_f = nn.LayerNorm(WIDTH)
        self.tied = tied
        self.head = None if tied else nn.Linear(WIDTH, VOCAB)
        self.layout = layout

    def forward(self, idx):
        h = self.tok(idx) + self.pos(self.positions)
        if self.attn is not None:
            a = self.ln1(h)
            h = h + self.attn(a, a, a, attn_mask=self.causal, need_weights=False)[0]
        if self.mlp is not None:
            h = h + self.mlp(self.ln2(h))
        h = self.ln_f(h)
        logits = F.linear(h, self.tok.weight) if self.tied else self.head(h)
        if self.layout == "flat":
            return logits.flatten(0, 1)
        return logits.transpose(1, 2)


class Bigram(nn.Module):
    """Logits are an embedding lookup: linear in the parameters (GGN == Hessian)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, idx):
        return self.table(idx).transpose(1, 2)


LM_KINDS = ["embed", "attention", "mlp_block", "tied", "gpt", "gpt_flat"]


def make_lm(kind: str) -> nn.Module:
    """A float64 LM of the zoo (seeded)."""
    torch.manual_seed(0)
    if kind == "bigram":
        m: nn.Module = Bigram()
    elif kind == "embed":
        m = TinyLM(attention=False, mlp=False)
    elif kind == "attention":
        m = TinyLM(attention=True, mlp=False)
    elif kind == "mlp_block":
        m = TinyLM(attention=False, mlp=True)
    elif kind == "tied":
        m = TinyLM(attention=False, mlp=True, tied=True)
    elif kind == "gpt":
        m = TinyLM(attention=True, mlp=True, tied=True)
    elif kind == "gpt_flat":
        m = TinyLM(attention=True, mlp=True, tied=True, layout="flat")
    else:  # pragma: no cover
        raise ValueError(kind)
    return m.to(DT)


def lm_batch(n: int = 3, seed: int = 1, pad: bool = True, flat: bool = False,
             ignore_index: int = -100):
    """``(tokens (N, S) int64, targets)``: next-token targets, the tails of some sequences
    padded with ``ignore_index`` (example 0 keeps 2 targets, example 1 all, example 2 four)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    targets = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    if pad:
        targets[0, 2:] = ignore_index
        if n > 2:
            targets[2, 4:] = ignore_index
    return tokens, (targets.reshape(-1) if flat else targets)
