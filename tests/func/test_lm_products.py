"""Language-model curvature: cross-entropy with ignore_index / label_smoothing / weight, integer
token inputs, attention, tied embeddings; products and operators against dense float64 oracles."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _cases import DT, LM_KINDS, lm_batch, make_lm, make_model
from _oracles import all_names, dense_ef, dense_fisher, dense_ggn, dense_hessian, output_fisher
from torch import nn

import curvlab
from curvlab.func import (
    empirical_fisher_vector_product,
    fisher_vector_product,
    ggn_vector_product,
    hessian_vector_product,
    loss_rule,
    select_params,
)
from curvlab.func.cross_entropy import CrossEntropyRule

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # vmap-ed backward through CPU flash attention: correct, slower (torch warns)
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]
RTOL, ATOL = 1e-8, 1e-10
CLASSES = 3  # the "seq" models of tests/_cases.py


def _weight(num_classes: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, num_classes, dtype=DT)


# every combination: (ignore padding, label_smoothing, weight) x reduction
CE_COMBOS = [
    (pad, smoothing, weighted, reduction)
    for pad, smoothing, weighted, reduction in itertools.product(
        [True, False], [0.0, 0.1], [False, True], ["mean", "sum"]
    )
]


def _ce(num_classes, smoothing, weighted, reduction, ignore_index=-100):
    return nn.CrossEntropyLoss(
        weight=_weight(num_classes) if weighted else None,
        label_smoothing=smoothing,
        reduction=reduction,
        ignore_index=ignore_index,
    )


def _seq_batch(pad: bool, ignore_index: int = -100, fully_padded: bool = True):
    """``(x (4, 2, 5), y (4, 5))`` for the (N, C, S) "seq" models; padded tails, example 1 all
    padded (no loss of its own)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 5, generator=g, dtype=DT)
    y = torch.randint(0, CLASSES, (4, 5), generator=g)
    if pad:
        y[0, 3:] = ignore_index
        if fully_padded:
            y[1, :] = ignore_index
        y[3, 1] = ignore_index
    return x, y


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in (ts.values() if isinstance(ts, dict) else ts)])


def _tangent(model, seed: int = 0):
    params = select_params(model)
    g = torch.Generator().manual_seed(seed)
    vl = [torch.randn(p.shape, generator=g, dtype=DT) for p in params.values()]
    return vl, _flat(vl)


# ------------------------------------------------------------------------------------------
# the closed-form rule against autodiff of PyTorch's loss


@pytest.mark.parametrize(("pad", "smoothing", "weighted", "reduction"), CE_COMBOS)
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5)])
def test_cross_entropy_rule_exact(pad, smoothing, weighted, reduction, shape):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=g, dtype=DT)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if pad:
        y.view(-1)[::3] = -100
    loss_fn = _ce(shape[1], smoothing, weighted, reduction)
    rule = loss_rule(loss_fn)
    assert isinstance(rule, CrossEntropyRule)
    rule.check(out, y)
    torch.testing.assert_close(rule.value(out, y), loss_fn(out, y), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(rule.grad(out, y), torch.func.grad(lambda o: loss_fn(o, y))(out),
                               rtol=RTOL, atol=ATOL)
    m = out.numel()
    H = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(m, m)
    v = torch.randn(shape, generator=g, dtype=DT)
    torch.testing.assert_close(rule.hessian_vp(out, y, v).reshape(-1), H @ v.reshape(-1),
                               rtol=RTOL, atol=ATOL)
    # sqrt . sqrt^T = Hessian, per loss term (position); loss terms never mixed
    S = rule.sqrt_hessian(out, y).movedim(2, -1).reshape(shape[1], -1, shape[1])  # (K, terms, C)
    blocks = torch.einsum("kti,ktj->tij", S, S)
    perm = torch.arange(m).reshape(shape).movedim(1, -1).reshape(-1)
    moved = H[perm][:, perm]
    torch.testing.assert_close(torch.block_diag(*blocks), moved, rtol=RTOL, atol=ATOL)
    # what 'mean' divides by: PyTorch's D (sum of weights of non-ignored targets)
    if reduction == "mean":
        none = _ce(shape[1], 0.0, weighted, "none")
        d = none(torch.zeros_like(out), y).sum() / math.log(shape[1])
        assert rule.num_loss_terms(out, y) == pytest.approx(float(d), rel=1e-12)


@pytest.mark.parametrize(("pad", "smoothing", "weighted", "reduction"), CE_COMBOS)
def test_per_example_grads_are_each_examples_own_loss(pad, smoothing, weighted, reduction):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(4, 3, 5, generator=g, dtype=DT)
    _, y = _seq_batch(pad)
    loss_fn = _ce(3, smoothing, weighted, reduction)

    def single(o, t):
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    ref = torch.nan_to_num(torch.func.vmap(torch.func.grad(single))(out, y), nan=0.0)
    torch.testing.assert_close(loss_rule(loss_fn).per_example_grads(out, y), ref, rtol=RTOL,
                               atol=ATOL)


# ------------------------------------------------------------------------------------------
# products and operators against the dense oracles, (N, C, S) outputs


@pytest.mark.parametrize(("pad", "smoothing", "weighted", "reduction"), CE_COMBOS)
def test_products_and_operators_match_oracles(pad, smoothing, weighted, reduction):
    model, _ = make_model("seq")
    x, y = _seq_batch(pad)
    loss_fn = _ce(CLASSES, smoothing, weighted, reduction)
    names = all_names(model)
    vl, v = _tangent(model)
    H = dense_hessian(model, loss_fn, x, y, names)
    G = dense_ggn(model, loss_fn, x, y, names)
    E = dense_ef(model, loss_fn, x, y, names)
    torch.testing.assert_close(dense_fisher(model, loss_fn, x, y, names), G, rtol=RTOL,
                               atol=ATOL)  # CE: the true Fisher is the GGN
    torch.testing.assert_close(_flat(hessian_vector_product(model, loss_fn, None, x, y, vl)),
                               H @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(_flat(ggn_vector_product(model, loss_fn, None, x, y, vl)),
                               G @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        _flat(empirical_fisher_vector_product(model, loss_fn, None, x, y, vl)), E @ v,
        rtol=RTOL, atol=ATOL)
    data = (x, y)
    torch.testing.assert_close(curvlab.Hessian(model, loss_fn, data).to_dense(), H, rtol=RTOL,
                               atol=ATOL)
    torch.testing.assert_close(curvlab.GGN(model, loss_fn, data).to_dense(), G, rtol=RTOL,
                               atol=ATOL)
    torch.testing.assert_close(curvlab.EmpiricalFisher(model, loss_fn, data).to_dense(), E,
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("pad", "smoothing", "weighted", "reduction"), CE_COMBOS)
@pytest.mark.parametrize("kind", ["seq_linear", "bigram"])
def test_ggn_equals_hessian_for_model_linear_in_parameters(kind, pad, smoothing, weighted,
                                                           reduction):
    if kind == "bigram":
        model = make_lm("bigram")
        x, y = lm_batch(pad=pad)
        num_classes = model.table.num_embeddings
    else:
        model, _ = make_model(kind)
        x, y = _seq_batch(pad)
        num_classes = CLASSES
    loss_fn = _ce(num_classes, smoothing, weighted, reduction)
    data = (x, y)
    H = curvlab.Hessian(model, loss_fn, data).to_dense()
    torch.testing.assert_close(curvlab.GGN(model, loss_fn, data).to_dense(), H, rtol=RTOL,
                               atol=ATOL)
    torch.testing.assert_close(H, dense_hessian(model, loss_fn, x, y, all_names(model)),
                               rtol=RTOL, atol=ATOL)
    vl, v = _tangent(model)
    torch.testing.assert_close(_flat(ggn_vector_product(model, loss_fn, None, x, y, vl)),
                               H @ v, rtol=RTOL, atol=ATOL)


def test_non_default_ignore_index():
    model, _ = make_model("seq")
    x, y = _seq_batch(True, ignore_index=1)  # class 1 is "padding" (also a real class index)
    loss_fn = _ce(CLASSES, 0.1, True, "mean", ignore_index=1)
    names = all_names(model)
    torch.testing.assert_close(curvlab.GGN(model, loss_fn, (x, y)).to_dense(),
                               dense_ggn(model, loss_fn, x, y, names), rtol=RTOL, atol=ATOL)


def test_bad_targets_raise():
    rule = loss_rule(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"\[0, 3\) or equal ignore_index=-100"):
        rule.check(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="weight has 2 entries for 3 classes"):
        loss_rule(nn.CrossEntropyLoss(weight=torch.ones(2))).check(torch.zeros(2, 3),
                                                                  torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class weights.*need the targets"):
        loss_rule(nn.CrossEntropyLoss(weight=torch.ones(3))).sample_grads(torch.zeros(2, 3), 1)


# ------------------------------------------------------------------------------------------
# LM zoo: integer tokens through every curvature


LM_LOSSES = [(0.0, False, "mean"), (0.1, True, "mean"), (0.1, False, "sum")]


@pytest.mark.parametrize(("smoothing", "weighted", "reduction"), LM_LOSSES)
@pytest.mark.parametrize("kind", LM_KINDS)
def test_lm_zoo_products_match_oracles(kind, smoothing, weighted, reduction):
    model = make_lm(kind)
    flat = kind.endswith("_flat")
    tokens, targets = lm_batch(flat=flat)
    loss_fn = _ce(7, smoothing, weighted, reduction)
    names = all_names(model)
    vl, v = _tangent(model)
    G = dense_ggn(model, loss_fn, tokens, targets, names)
    H = dense_hessian(model, loss_fn, tokens, targets, names)
    torch.testing.assert_close(_flat(ggn_vector_product(model, loss_fn, None, tokens, targets,
                                                        vl)), G @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(_flat(hessian_vector_product(model, loss_fn, None, tokens,
                                                            targets, vl)),
                               H @ v, rtol=RTOL, atol=ATOL)
    data = (tokens, targets)
    op = curvlab.GGN(model, loss_fn, data)
    torch.testing.assert_close(op @ v, G @ v, rtol=RTOL, atol=ATOL)
    M = torch.stack([v, -v, 2 * v], 1)  # matrix products: vmap-ed tangent and backward passes
    torch.testing.assert_close(op @ M, G @ M, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(curvlab.Hessian(model, loss_fn, data) @ v, H @ v, rtol=RTOL,
                               atol=ATOL)
    if not flat:  # flattened logits: each position is an "example" of the EF
        E = dense_ef(model, loss_fn, tokens, targets, names)
        torch.testing.assert_close(curvlab.EmpiricalFisher(model, loss_fn, data) @ v, E @ v,
                                   rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(
            _flat(empirical_fisher_vector_product(model, loss_fn, None, tokens, targets, vl)),
            E @ v, rtol=RTOL, atol=ATOL)


def test_lm_loss_wrapper_flattening_nsc_logits():
    """(N, S, C) logits flattened in a loss wrapper: the autodiff rule, same curvature."""
    model = make_lm("gpt")
    tokens, targets = lm_batch()
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)

    def wrapper(logits_ncs, y):
        return ce(logits_ncs.transpose(1, 2).flatten(0, 1), y.flatten())

    names = all_names(model)
    vl, v = _tangent(model)
    torch.testing.assert_close(_flat(ggn_vector_product(model, wrapper, None, tokens, targets,
                                                        vl)),
                               dense_ggn(model, ce, tokens, targets, names) @ v, rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize("kind", ["embed", "gpt"])
def test_lm_mc_fisher_is_unbiased_and_operator_runs(kind):
    model = make_lm(kind)
    tokens, targets = lm_batch()
    loss_fn = _ce(7, 0.1, True, "mean")
    names = all_names(model)
    vl, v = _tangent(model)
    F = dense_fisher(model, loss_fn, tokens, targets, names)
    torch.testing.assert_close(F, dense_ggn(model, loss_fn, tokens, targets, names), rtol=RTOL,
                               atol=ATOL)
    est = _flat(fisher_vector_product(model, loss_fn, None, tokens, vl, mc_samples=20000,
                                      generator=torch.Generator().manual_seed(0),
                                      targets=targets))
    assert ((est - F @ v).norm() / (F @ v).norm()).item() < 0.05
    # the operator (no targets passed to the sampler): unweighted CE, unpadded targets
    _, full = lm_batch(pad=False)
    fisher = curvlab.Fisher(model, nn.CrossEntropyLoss(), (tokens, full), mc_samples=4,
                            generator=0)
    out = fisher @ v
    assert torch.isfinite(out).all()
    torch.testing.assert_close(v @ (fisher @ (2 * v)), 2 * v @ out, rtol=1e-10, atol=1e-12)


def test_mc_fisher_never_samples_an_ignored_position():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 7, 5, generator=g, dtype=DT)
    _, targets = lm_batch()
    ignored = targets == -100
    for loss_fn in (_ce(7, 0.0, False, "mean"), _ce(7, 0.1, True, "sum")):
        rule = loss_rule(loss_fn)
        samples = rule.sample_grads(out, 500, torch.Generator().manual_seed(1), target=targets)
        at_ignored = samples.movedim(2, -1)[:, ignored]
        assert at_ignored.abs().max().item() == 0.0  # exactly zero (tolerance 0)
        assert samples.movedim(2, -1)[:, ~ignored].abs().min(-1).values.max().item() > 0
        # the sample covariance estimates the per-position Hessian blocks (seeded; tol 0.1)
        m = out.numel()
        cov = torch.einsum("si,sj->ij", samples.reshape(500, m), samples.reshape(500, m)) / 500
        ids = (torch.arange(3)[:, None, None] * 5 + torch.arange(5)[None, None, :]).expand(
            3, 7, 5).reshape(-1)
        same = ids[:, None] == ids[None, :]
        exact = output_fisher(loss_fn, out, targets)
        assert torch.equal(exact[~same], torch.zeros_like(exact[~same]))
        assert ((cov - exact)[same].norm() / exact.norm()).item() < 0.1
        u = torch.randn(out.shape, generator=g, dtype=DT)
        r = rule.mc_fisher_vp(out, u, 8, torch.Generator().manual_seed(2), target=targets)
        assert r.movedim(1, -1)[ignored].abs().max().item() == 0.0


# ------------------------------------------------------------------------------------------
# optimizers on the LM zoo


@pytest.mark.parametrize("kind", ["embed", "gpt", "gpt_flat"])
def test_curveball_and_hessian_free_step_on_lm(kind):
    for make_opt in (
        lambda m, f: curvlab.optim.CurveBall(m, f),
        lambda m, f: curvlab.optim.HessianFree(m, f, max_cg_iters=5),
    ):
        model = make_lm(kind)
        tokens, targets = lm_batch(flat=kind.endswith("_flat"))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        loss = make_opt(model, loss_fn).step(tokens, targets)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, loss_fn(*_forward(model, tokens, targets, before)),
                                   rtol=1e-12, atol=1e-12)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def _forward(model, tokens, targets, params):
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (tokens,))
    return out, targets


def test_padded_batches_are_weighted_by_their_non_ignored_targets():
    """Two padded batches give the curvature of one concatenated batch (mean over targets)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    y[[0, 1, 2, 7]] = -100  # batch 1 keeps 2 of 5 targets, batch 2 keeps 4 of 5
    for op in (curvlab.GGN, curvlab.EmpiricalFisher):
        split = op(net, loss_fn, [(x[:5], y[:5]), (x[5:], y[5:])]).to_dense()
        whole = op(net, loss_fn, (x, y)).to_dense()
        torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
