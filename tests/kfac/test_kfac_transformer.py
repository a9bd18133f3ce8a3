"""K-FAC for the layers of a transformer: embeddings, attention projections, expand vs reduce,
tied weights (float64 against definitions and dense GGN blocks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab.kfac import FactorCapture, find_layers
from curvlab.kfac.attention import attention_forward
from curvlab.kfac.factors import kfac_factors
from curvlab.optim import KFACOptimizer

DT = torch.float64


class TinyLM(nn.Module):
    def __init__(self, vocab=7, d=4, heads=2, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        n = x.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(self.ln(h + a)).transpose(1, 2)  # (N, C, S)


def _block(dense, idx):
    return dense[idx[:, None], idx[None, :]]


def _index(net, names):
    offs, out = 0, {}
    for n, p in net.named_parameters():
        out[n] = torch.arange(offs, offs + p.numel())
        offs += p.numel()
    return torch.cat([out[n] for n in names])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["causal", "float", "padding", "none"])
def test_captured_attention_equals_the_module(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 3, batch_first=batch_first).to(DT)
    x = torch.randn(2, 5, 6, dtype=DT) if batch_first else torch.randn(5, 2, 6, dtype=DT)
    kw = {}
    if masks == "causal":
        kw["attn_mask"] = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    elif masks == "float":
        kw["attn_mask"] = torch.randn(5, 5, dtype=DT)
    elif masks == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    ref, ref_w = mha(x, x, x, **kw)
    records = []
    out, w = attention_forward(mha, lambda j, a, b: records.append(j))(x, x, x, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(out.sum(), mha.in_proj_weight)[0]
    g2 = torch.autograd.grad(mha(x, x, x, **kw)[0].sum(), mha.in_proj_weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert records == [0, 1, 2]


def test_unbatched_attention_and_module_restored():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2).to(DT)
    x = torch.randn(3, 4, dtype=DT)
    out, _ = attention_forward(mha, lambda *a: None)(x, x, x)
    torch.testing.assert_close(out, mha(x, x, x)[0], rtol=1e-10, atol=1e-12)
    table = find_layers(nn.Sequential(mha))
    with FactorCapture(table):
        assert "forward" in vars(mha)
    assert "forward" not in vars(mha)


def test_single_token_blocks_equal_the_ggn():
    """One example, one position: K-FAC type-2 is exact for every Kronecker layer."""
    torch.manual_seed(1)
    net = TinyLM().to(DT)
    x, y = torch.randint(0, 7, (1, 1)), torch.randint(0, 7, (1, 1))
    loss = nn.CrossEntropyLoss()
    K = curvlab.KFAC(net, loss, (x, y), strict=True)
    dense, ggn = K.to_dense(), curvlab.GGN(net, loss, (x, y)).to_dense()
    for names in (["emb.weight"], ["attn.out_proj.weight", "attn.out_proj.bias"],
                  ["head.weight", "head.bias"]):
        idx = _index(net, names)
        torch.testing.assert_close(_block(dense, idx), _block(ggn, idx), rtol=1e-8, atol=1e-12)
    # the value rows of in_proj (weight rows 8..11 and bias 8..11): exact as well
    w0 = _index(net, ["attn.in_proj_weight"])[8 * 4:12 * 4]
    b0 = _index(net, ["attn.in_proj_bias"])[8:12]
    torch.testing.assert_close(_block(dense, w0), _block(ggn, w0), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(_block(dense, b0), _block(ggn, b0), rtol=1e-8, atol=1e-12)


def test_embedding_input_factor_is_token_frequency():
    net = TinyLM().to(DT)
    x = torch.tensor([[0, 1, 1], [1, 6, 6]])
    f = kfac_factors(net, nn.CrossEntropyLoss(), x, torch.zeros(2, 3, dtype=torch.long),
                     find_layers(net, grouped_conv=True))["emb"]
    torch.testing.assert_close(f.A.dense().diagonal(),
                               torch.tensor([1, 3, 0, 0, 0, 0, 2], dtype=DT) / 2)


def test_kfac_reduce_is_exact_for_pooled_sequences_and_expand_is_not():
    """A Linear on (N, S, d) whose output is mean-pooled before an MSE loss: reduce is exact."""
    torch.manual_seed(2)

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).mean(1)

    net = Pool().to(DT)
    x, y = torch.randn(5, 4, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    ggn = curvlab.GGN(net, nn.MSELoss(), (x, y)).to_dense()
    red = curvlab.KFAC(net, nn.MSELoss(), (x, y), kfac_approx="reduce").to_dense()
    exp = curvlab.KFAC(net, nn.MSELoss(), (x, y), kfac_approx="expand").to_dense()
    torch.testing.assert_close(red, ggn, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(exp, ggn)
    with pytest.raises(ValueError, match="kfac_approx"):
        curvlab.KFAC(net, nn.MSELoss(), (x, y), kfac_approx="mean")


def test_tied_weights_follow_the_unsupported_policy():
    net = TinyLM(tied=True)
    with pytest.raises(ValueError, match="tied"):
        KFACOptimizer(net, nn.CrossEntropyLoss(), damping=0.1, strict=True)
    with pytest.warns(UserWarning, match="tied"):
        opt = KFACOptimizer(net, nn.CrossEntropyLoss(), damping=0.1)
    assert "emb.weight" in opt.unsupported and "emb" not in opt.engine.blocks


def test_optimizer_and_preconditioner_train_a_token_model():
    torch.manual_seed(3)
    x, y = torch.randint(0, 7, (8, 6)), torch.randint(0, 7, (8, 6))
    y[:, :2] = -100  # padded targets
    loss_fn = nn.CrossEntropyLoss()
    for fisher in ("mc", "type2", "empirical"):
        net = TinyLM()
        opt = KFACOptimizer(net, loss_fn, lr=0.1, damping=0.1, fisher=fisher, strict=True)
        losses = [float(opt.step(x, y)) for _ in range(8)]
        assert losses[-1] < losses[0]
    net = TinyLM()
    pre = curvlab.KFACPreconditioner(net, loss_fn, damping=0.1, strict=True, kfac_approx="reduce")
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    first = None
    for _ in range(8):
        sgd.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        pre.step()
        sgd.step()
        first = first if first is not None else float(loss)
    assert float(loss) < first
