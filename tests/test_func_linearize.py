"""curvlab.func: linearization engines, pure product functions, loss rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


class Residual(nn.Module):
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


def models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(2, 2, 1), nn.AvgPool2d(3), nn.Flatten(),
                        nn.Linear(2, 3))
    bn_eval = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.LeakyReLU(0.1),
                            nn.Linear(5, 3)).eval()
    with torch.no_grad():
        bn_eval[1].running_mean.normal_()
        bn_eval[1].running_var.uniform_(0.5, 2)
    return {
        "cnn_bn_train": (cnn.to(DT), (1, 6, 6)),
        "bn_eval": (bn_eval.to(DT), (4,)),
        "residual": (Residual().to(DT), (4,)),
        "mlp": (nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT), (4,)),
    }


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
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def call(t):
        parts = torch.split(t, sizes)
        return torch.func.functional_call(
            model, {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)}, (x,))

    H = torch.func.hessian(lambda t: loss_fn(call(t), y))(theta)
    J = torch.func.jacrev(call)(theta).reshape(15, -1)
    out = call(theta).detach()
    HL = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(15, 15)
    G = J.T @ HL @ J
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
    def single(t, xn, yn):
        parts = torch.split(t, sizes)
        o = torch.func.functional_call(
            model, {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)},
            (xn.unsqueeze(0),))
        return loss_fn(o, yn.unsqueeze(0))

    g = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(theta, x, y)
    torch.testing.assert_close(flat(empirical_fisher_vector_product(model, loss_fn, None, x, y,
                                                                    vl)),
                               g.T @ (g @ v) / 5, rtol=1e-8, atol=1e-10)
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
