"""curvlab.func: linearization engines, pure product functions, loss rules."""

from __future__ import annotations

import pytest
import torch
from _cases import LM_KINDS, lm_batch, make_lm, make_model
from _oracles import all_names, dense_ef, dense_ggn, dense_hessian
from torch import nn

from curvlab.func import (
    empirical_fisher_vector_product,
    fisher_vector_product,
    ggnvp,
    hessian_vector_product,
    hessian_vector_products,
    linearize,
    loss_rule,
    select_params,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


MODEL_KINDS = {  # name in this file -> tests/_cases.py kind
    "cnn_bn_train": "cnn_bn_train",
    "bn_eval": "bn_eval_leaky",
    "residual": "residual_cat",
    "mlp": "mlp_sigmoid",
}


def models():
    return {name: make_model(kind) for name, kind in MODEL_KINDS.items()}


@pytest.mark.parametrize("name", list(models()))
def test_engines_agree_with_torch_func(name):
    model, shape = models()[name]
    x = torch.randn(4, *shape, dtype=DT)
    params = select_params(model)
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    before = {k: t.clone() for k, t in model.state_dict().items()}
    lay = linearize(model, params, x, engine="layerwise")
    fun = linearize(model, params, x, engine="functional")
    assert (lay.engine, fun.engine) == ("layerwise", "functional")
    torch.testing.assert_close(lay.output, fun.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lay.jvp(v), fun.jvp(v), rtol=1e-10, atol=1e-12)
    # reference: torch.func.jvp of the functional model
    from curvlab.func.params import cloned_buffers

    buffers = cloned_buffers(model)
    primals = {n: p.detach() for n, p in params.items()}
    _, ref = torch.func.jvp(
        lambda p: torch.func.functional_call(model, (p, buffers), (x,)), (primals,), (v,))
    torch.testing.assert_close(lay.jvp(v), ref, rtol=1e-10, atol=1e-12)
    r = torch.randn(lay.output.shape, generator=g, dtype=DT)
    for a, b in zip(lay.vjp(r), fun.vjp(r), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # batched forms agree with single ones
    vb = {n: torch.stack([t, 2 * t]) for n, t in v.items()}
    jb = lay.jvp_batched(vb)
    torch.testing.assert_close(jb[1], 2 * lay.jvp(v), rtol=1e-10, atol=1e-12)
    rb = lay.vjp_batched(torch.stack([r, -r]))
    torch.testing.assert_close(rb[0][1], -lay.vjp(r)[0], rtol=1e-10, atol=1e-12)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_update_buffers_updates_running_stats_once():
    model, shape = models()["cnn_bn_train"]
    x = torch.randn(4, *shape, dtype=DT)
    ref = models()["cnn_bn_train"][0]
    ref(x)
    linearize(model, select_params(model), x, update_buffers=True)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("engine", ["layerwise", "functional"])
def test_dropout_same_mask_for_repeated_jvps(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    params = select_params(model)
    lin = linearize(model, params, x, engine=engine)
    v = {n: torch.randn_like(p) for n, p in params.items()}
    a, b = lin.jvp(v), lin.jvp(v)
    assert torch.equal(a, b)
    torch.testing.assert_close(lin.jvp({n: 3 * t for n, t in v.items()}), 3 * a)
    # the mask used by jvp is the one of the recorded forward: J^T consistent with J
    r = torch.randn_like(lin.output)
    lhs = (r * a).sum()
    rhs = sum((g * v[n]).sum() for n, g in zip(lin.names, lin.vjp(r), strict=True))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


def test_pure_products_match_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    params = select_params(model)
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    assert names == all_names(model)
    H = dense_hessian(model, loss_fn, x, y, names)
    G = dense_ggn(model, loss_fn, x, y, names)
    v = torch.randn_like(theta)
    vl = [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes, strict=True)]

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in (ts.values() if isinstance(ts, dict) else ts)])

    torch.testing.assert_close(flat(hessian_vector_product(model, loss_fn, None, x, y, vl)),
                               H @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(flat(ggnvp(model, loss_fn, None, x, y, vl)), G @ v, rtol=1e-8,
                               atol=1e-10)
    vd = dict(zip(names, vl, strict=True))
    out_d = hessian_vector_product(model, loss_fn, None, x, y, vd)
    assert list(out_d) == names
    # several tangents at once
    prods = hessian_vector_products(model, loss_fn, params, x, y, [vl, [2 * t for t in vl]])
    torch.testing.assert_close(flat(prods[1]), 2 * H @ v, rtol=1e-8, atol=1e-10)
    # empirical Fisher: per-example gradient oracle
    torch.testing.assert_close(flat(empirical_fisher_vector_product(model, loss_fn, None, x, y,
                                                                    vl)),
                               dense_ef(model, loss_fn, x, y, names) @ v, rtol=1e-8, atol=1e-10)
    f = fisher_vector_product(model, loss_fn, None, x, vl, mc_samples=2,
                              generator=torch.Generator().manual_seed(0))
    assert flat(f).shape == v.shape


def test_hessian_vector_product_mse_mean_forward_ad_workaround():
    # mse_loss's backward has no usable forward-AD path with implicit zero target tangents
    model = nn.Linear(2, 1).to(DT)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    v = [torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT)]
    out = hessian_vector_product(model, nn.MSELoss(), None, x, y, v)
    xb = torch.cat([x, torch.ones(4, 1, dtype=DT)], 1)
    torch.testing.assert_close(torch.cat([out[0].reshape(-1), out[1]]),
                               2 * xb.T @ xb @ torch.ones(3, dtype=DT) / 4)


def test_loss_rules_num_loss_terms_and_errors():
    assert loss_rule(nn.CrossEntropyLoss()).num_loss_terms(torch.zeros(2, 3, 4)) == 8
    assert loss_rule(nn.MSELoss()).num_loss_terms(torch.zeros(2, 3)) == 6
    assert loss_rule(nn.BCEWithLogitsLoss()).num_loss_terms(torch.zeros(2, 3)) == 6
    with pytest.raises(ValueError, match="reduction='none'"):
        loss_rule(nn.MSELoss(reduction="none"))
    with pytest.raises(TypeError, match="callable"):
        loss_rule(3)
    with pytest.raises(ValueError, match="engine"):
        linearize(nn.Linear(2, 2), {}, torch.zeros(1, 2), engine="magic")


@pytest.mark.parametrize(
    "subset", [["0.bias"], ["0.weight"], ["2.weight", "0.bias"], ["3.bias"], None]
)
def test_layerwise_param_subsets_and_grouped_conv(subset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)).to(DT)
    # name "3.bias" does not exist (Flatten): use the Linear's bias instead
    subset = None if subset is None else [("4.bias" if n == "3.bias" else n) for n in subset]
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    params = select_params(model, subset)
    v = {n: torch.randn_like(p) for n, p in params.items()}
    lay = linearize(model, params, x, engine="layerwise")
    fun = linearize(model, params, x, engine="functional")
    torch.testing.assert_close(lay.jvp(v), fun.jvp(v), rtol=1e-10, atol=1e-12)
    vb = {n: torch.stack([t, -t]) for n, t in v.items()}
    torch.testing.assert_close(lay.jvp_batched(vb)[1], -fun.jvp(v), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# integer / boolean inputs, Embedding, LayerNorm, GELU, attention


def _jvp_reference(model, params, x, v):
    from curvlab.func.forward_ad import forward_ad_kernels
    from curvlab.func.params import cloned_buffers

    buffers = cloned_buffers(model)
    primals = {n: p.detach() for n, p in params.items()}
    with forward_ad_kernels():
        return torch.func.jvp(
            lambda p: torch.func.functional_call(model, ({**primals, **p}, buffers), (x,)),
            (primals,), (v,))[1]


def _check_engines(model, x, *, layerwise_rules=()):
    params = select_params(model)
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    lay = linearize(model, params, x, engine="layerwise")
    fun = linearize(model, params, x, engine="functional")
    torch.testing.assert_close(lay.output, fun.output, rtol=1e-12, atol=1e-12)
    ref = _jvp_reference(model, params, x, v)
    torch.testing.assert_close(lay.jvp(v), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fun.jvp(v), ref, rtol=1e-10, atol=1e-12)
    r = torch.randn(lay.output.shape, generator=g, dtype=DT)
    lhs = (r * lay.jvp(v)).sum()
    rhs = sum((gr * v[n]).sum() for n, gr in zip(lay.names, lay.vjp(r), strict=True))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)
    vb = {n: torch.stack([t, -2 * t]) for n, t in v.items()}
    torch.testing.assert_close(lay.jvp_batched(vb)[1], -2 * ref, rtol=1e-10, atol=1e-12)
    kinds = {type(e.target[0]) for e in lay._tape if e.kind == "module"}
    for cls in layerwise_rules:
        assert cls in kinds, (cls, kinds)
    return lay


@pytest.mark.parametrize("kind", LM_KINDS)
def test_lm_zoo_integer_tokens_both_engines(kind):
    model = make_lm(kind)
    tokens, _ = lm_batch()
    assert tokens.dtype == torch.int64
    lay = _check_engines(model, tokens, layerwise_rules=(nn.Embedding, nn.LayerNorm))
    assert lay.engine == "layerwise"
    if kind in ("mlp_block", "tied", "gpt"):
        assert nn.GELU in {type(e.target[0]) for e in lay._tape if e.kind == "module"}


def test_embedding_padding_idx_row_is_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=2), nn.Tanh(), nn.Linear(3, 4)).to(DT)
    x = torch.tensor([[0, 2, 5], [2, 2, 1]])
    params = select_params(model)
    lin = linearize(model, params, x, engine="layerwise")
    v = {n: torch.randn_like(p) for n, p in params.items()}
    r = torch.randn_like(lin.output)
    lhs = (r * lin.jvp(v)).sum()
    rhs = sum((g * v[n]).sum() for n, g in zip(lin.names, lin.vjp(r), strict=True))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)  # J is the backward's adjoint
    only_pad = {"0.weight": torch.zeros(6, 3, dtype=DT).index_fill_(0, torch.tensor([2]), 1.0)}
    assert torch.equal(lin.jvp(only_pad), torch.zeros_like(lin.output))


class _MaskedInputs(nn.Module):
    """Input dict with a float tensor, a boolean mask and integer ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3, elementwise_affine=False)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, inp):
        h = self.emb(inp["ids"]) + self.lin(inp["x"])
        h = self.act(self.norm(h))
        return h * inp["mask"].unsqueeze(-1).to(h.dtype)


def test_dict_inputs_with_bool_and_int_tensors():
    model = _MaskedInputs().to(DT)
    g = torch.Generator().manual_seed(0)
    inp = {
        "x": torch.randn(4, 2, 3, generator=g, dtype=DT),
        "ids": torch.randint(0, 5, (4, 2), generator=g),
        "mask": torch.rand(4, 2, generator=g) > 0.3,
    }
    _check_engines(model, inp, layerwise_rules=(nn.Embedding, nn.LayerNorm, nn.GELU))
