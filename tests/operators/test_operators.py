"""Curvature operators (Hessian, GGN, Fisher, EmpiricalFisher) against dense float64 oracles."""

from __future__ import annotations

import pytest
import torch
from _cases import make_data, make_loss, make_model
from _oracles import aggregate, all_names, dense_ef, dense_ggn, dense_hessian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlab.linalg import hutchinson_trace, lanczos
from curvlab.operators import GGN, EmpiricalFisher, Fisher, Hessian, LinearOperator

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
RTOL, ATOL = 1e-8, 1e-10


# models, data and dense oracles: tests/_cases.py, tests/_oracles.py


# ------------------------------------------------------------------------------------------
# correctness against oracles

CASES = [
    ("mlp_tanh", "ce", "mean"),
    ("mlp_tanh", "ce", "sum"),
    ("mlp_tanh", "mse", "mean"),
    ("mlp_tanh", "mse", "sum"),
    ("mlp_tanh", "bce", "mean"),
    ("mlp_tanh", "bce", "sum"),
    ("mlp_relu", "ce", "mean"),
    ("mlp_relu", "mse", "sum"),
    ("cnn", "ce", "mean"),
    ("cnn", "bce", "sum"),
    ("bn_train", "ce", "mean"),
    ("bn_eval", "mse", "mean"),
    ("bn_train", "bce", "sum"),
    ("residual", "mse", "mean"),
    ("residual", "ce", "sum"),
    ("seq", "ce", "mean"),
    ("seq", "ce", "sum"),
]


@pytest.mark.parametrize(("kind", "loss", "reduction"), CASES)
def test_operators_match_dense_oracles(kind, loss, reduction):
    model, shape = make_model(kind)
    loss_fn = make_loss(loss, reduction)
    batches = make_data(model, shape, loss)
    names = all_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    H = Hessian(model, loss_fn, batches)
    G = GGN(model, loss_fn, batches)
    E = EmpiricalFisher(model, loss_fn, batches)
    torch.testing.assert_close(
        H.to_dense(),
        aggregate(dense_hessian, model, loss_fn, batches, names),
        rtol=RTOL,
        atol=ATOL,
    )
    torch.testing.assert_close(
        G.to_dense(),
        aggregate(dense_ggn, model, loss_fn, batches, names),
        rtol=RTOL,
        atol=ATOL,
    )
    if not kind.startswith("bn_train"):  # per-example losses are undefined with batch stats
        torch.testing.assert_close(
            E.to_dense(),
            aggregate(dense_ef, model, loss_fn, batches, names, by_examples=True),
            rtol=RTOL,
            atol=ATOL,
        )
    # nothing the model owns changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_uneven_batches_equal_one_concatenated_batch(loss):
    model, shape = make_model("mlp_tanh")
    loss_fn = make_loss(loss, "mean")
    batches = make_data(model, shape, loss, sizes=(3, 5))
    cat = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    for op in (Hessian, GGN, EmpiricalFisher):
        torch.testing.assert_close(
            op(model, loss_fn, batches).to_dense(),
            op(model, loss_fn, cat).to_dense(),
            rtol=RTOL,
            atol=ATOL,
        )
    sum_fn = make_loss(loss, "sum")
    torch.testing.assert_close(
        GGN(model, sum_fn, batches).to_dense(),
        GGN(model, sum_fn, batches[:1]).to_dense() + GGN(model, sum_fn, batches[1:]).to_dense(),
        rtol=RTOL,
        atol=ATOL,
    )


def test_parameter_subset_list_and_dict():
    model, shape = make_model("mlp_tanh")
    loss_fn = nn.CrossEntropyLoss()
    batches = make_data(model, shape, "ce")
    names = ["2.weight", "0.bias"]  # user order is kept
    H = Hessian(model, loss_fn, batches, params=names)
    assert H.param_names == names
    assert H.shape == (15 + 5, 15 + 5)
    torch.testing.assert_close(
        H.to_dense(),
        aggregate(dense_hessian, model, loss_fn, batches, names),
        rtol=RTOL,
        atol=ATOL,
    )
    named = dict(model.named_parameters())
    G = GGN(model, loss_fn, batches, params={n: named[n] for n in names})
    torch.testing.assert_close(
        G.to_dense(),
        aggregate(dense_ggn, model, loss_fn, batches, names),
        rtol=RTOL,
        atol=ATOL,
    )
    G2 = GGN(model, loss_fn, batches, params=[named["2.weight"], named["0.bias"]])
    assert G2.param_names == names


def test_frozen_parameters_are_excluded_by_default():
    model, shape = make_model("mlp_tanh")
    model[0].weight.requires_grad_(False)
    op = GGN(model, nn.MSELoss(), make_data(model, shape, "mse"))
    assert op.param_names == ["0.bias", "2.weight", "2.bias"]


# ------------------------------------------------------------------------------------------
# input forms


def test_product_input_forms():
    model, shape = make_model("mlp_tanh")
    G = GGN(model, nn.CrossEntropyLoss(), make_data(model, shape, "ce"))
    p = G.shape[0]
    dense = G.to_dense()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(p, generator=g, dtype=DT)
    m = torch.randn(p, 4, generator=g, dtype=DT)
    torch.testing.assert_close(G @ v, dense @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(G @ m, dense @ m, rtol=RTOL, atol=ATOL)
    as_list = G.unflatten(v)
    out_list = G @ as_list
    assert isinstance(out_list, list) and [t.shape for t in out_list] == G.param_shapes
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out_list]), dense @ v)
    out_dict = G @ G.unflatten(v, as_dict=True)
    assert list(out_dict) == all_names(model)
    # flat order is model.parameters() order, row-major
    first = dict(model.named_parameters())["0.weight"]
    torch.testing.assert_close(out_dict["0.weight"].reshape(-1), (dense @ v)[: first.numel()])
    # algebra and scipy from the base class
    torch.testing.assert_close(((G + 2.0 * G) - G) @ v, 2 * dense @ v, rtol=RTOL, atol=ATOL)
    assert G.T is G
    sp = G.to_scipy()
    torch.testing.assert_close(torch.from_numpy(sp @ v.numpy()), dense @ v)
    assert G.dtype == DT and G.device == torch.device("cpu")
    assert isinstance(G, LinearOperator)


# ------------------------------------------------------------------------------------------
# exact identities


def test_ggn_equals_hessian_for_model_linear_in_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).to(DT)  # linear in its parameters
    batches = make_data(model, (4,), "mse")
    for red in ("mean", "sum"):
        loss_fn = nn.MSELoss(reduction=red)
        torch.testing.assert_close(
            GGN(model, loss_fn, batches).to_dense(),
            Hessian(model, loss_fn, batches).to_dense(),
            rtol=RTOL,
            atol=ATOL,
        )


def test_hessian_of_deepobs_quadratic_deep_is_q():
    from curvlab.problems.quadratic import make_quadratic_deep

    prob = make_quadratic_deep(num_train=8, num_test=1)
    x, t = prob.dataset.train
    data = [(x[:3], t[:3]), (x[3:], t[3:])]
    H = Hessian(prob.model, prob.loss_fn, data)
    torch.testing.assert_close(H.to_dense(), prob.Q, rtol=RTOL, atol=1e-9)
    G = GGN(prob.model, prob.loss_fn, data)
    torch.testing.assert_close(G.to_dense(), prob.Q, rtol=RTOL, atol=1e-9)
    top = lanczos(H, k=2, num_iter=40, generator=torch.Generator().manual_seed(0)).eigenvalues
    torch.testing.assert_close(top, torch.linalg.eigvalsh(prob.Q)[-2:], rtol=1e-8, atol=1e-8)


@settings(max_examples=6, deadline=None)
@given(
    width=st.integers(1, 4),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    op_index=st.integers(0, 3),
    k=st.integers(1, 3),
)
def test_symmetry_and_linearity(width, n, seed, op_index, k):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, 2, (n,))
    loss_fn = nn.CrossEntropyLoss()
    ops = [
        Hessian(model, loss_fn, (x, y)),
        GGN(model, loss_fn, (x, y)),
        EmpiricalFisher(model, loss_fn, (x, y)),
        Fisher(model, loss_fn, (x, y), mc_samples=2, generator=seed),
    ]
    A = ops[op_index]
    p = A.shape[0]
    u, v = torch.randn(p, k, dtype=DT), torch.randn(p, k, dtype=DT)
    au, av = A @ u, A @ v
    torch.testing.assert_close((u * av).sum(0), (v * au).sum(0), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(A @ (2.0 * u - 3.0 * v), 2.0 * au - 3.0 * av, rtol=1e-8, atol=1e-10)
    # columns of a matrix product equal single products
    torch.testing.assert_close(au[:, 0], A @ u[:, 0].contiguous(), rtol=1e-10, atol=1e-12)


def test_mc_fisher_converges_to_ggn():
    model, shape = make_model("mlp_tanh")
    loss_fn = nn.CrossEntropyLoss()
    batches = make_data(model, shape, "ce")
    ggn = GGN(model, loss_fn, batches).to_dense()
    errors = []
    for s in (1, 100, 3000):
        f = Fisher(model, loss_fn, batches, mc_samples=s, generator=0).to_dense()
        torch.testing.assert_close(f, f.T, rtol=1e-10, atol=1e-12)
        errors.append(((f - ggn).norm() / ggn.norm()).item())
    assert errors[2] < 0.05, errors  # MC error ~ 1/sqrt(S)
    assert errors[2] < errors[1] < errors[0], errors


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_mc_fisher_unbiased_other_losses(loss):
    model, shape = make_model("mlp_tanh")
    loss_fn = make_loss(loss, "mean")
    batches = make_data(model, shape, loss)
    ggn = GGN(model, loss_fn, batches).to_dense()
    f = Fisher(model, loss_fn, batches, mc_samples=2000, generator=1).to_dense()
    assert ((f - ggn).norm() / ggn.norm()).item() < 0.08


def test_fisher_randomness_modes():
    model, shape = make_model("mlp_tanh")
    loss_fn = nn.CrossEntropyLoss()
    batches = make_data(model, shape, "ce")
    v = torch.randn(GGN(model, loss_fn, batches).shape[0], dtype=DT)
    seeded = Fisher(model, loss_fn, batches, generator=5)
    assert torch.equal(seeded @ v, seeded @ v)
    gen = Fisher(model, loss_fn, batches, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(gen @ v, gen @ v)
    torch.manual_seed(0)
    fresh = Fisher(model, loss_fn, batches)
    assert not torch.equal(fresh @ v, fresh @ v)


def test_empirical_fisher_differs_from_fisher():
    model, shape = make_model("mlp_tanh")
    loss_fn = nn.CrossEntropyLoss()
    batches = make_data(model, shape, "ce")
    e = EmpiricalFisher(model, loss_fn, batches).to_dense()
    g = GGN(model, loss_fn, batches).to_dense()
    assert ((e - g).norm() / g.norm()).item() > 0.1


@pytest.mark.parametrize("op_cls", [Hessian, GGN])
def test_lanczos_and_hutchinson_on_operators(op_cls):
    model, shape = make_model("cnn")
    loss_fn = nn.CrossEntropyLoss()
    op = op_cls(model, loss_fn, make_data(model, shape, "ce"))
    dense = op.to_dense()
    exact = torch.linalg.eigvalsh(dense)
    g = torch.Generator().manual_seed(0)
    res = lanczos(op, k=3, which="both", num_iter=op.shape[0], generator=g)
    want = torch.cat([exact[:1], exact[-2:]])
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-7, atol=1e-9)
    est = hutchinson_trace(op, num_samples=200, generator=g, batch_size=50)
    assert abs(est.estimate.item() - dense.trace().item()) < 5 * est.standard_error.item()


# ------------------------------------------------------------------------------------------
# buffers, grads, dropout


def test_bn_running_stats_and_grads_untouched():
    model, shape = make_model("bn_train")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    batches = make_data(model, shape, "ce")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for op_cls in (Hessian, GGN, EmpiricalFisher, Fisher):
        op = op_cls(model, nn.CrossEntropyLoss(), batches)
        op @ torch.randn(op.shape[0], 2, dtype=DT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].weight.grad is None


def test_dropout_model_matrix_product_consistent_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).to(DT)
    data = (torch.randn(5, 4, dtype=DT), torch.randint(0, 2, (5,)))
    for op_cls in (Hessian, GGN):
        op = op_cls(model, nn.CrossEntropyLoss(), data)
        v = torch.randn(op.shape[0], 3, dtype=DT)
        state = torch.get_rng_state()
        out = op @ v
        torch.set_rng_state(state)
        # same RNG -> same masks; a product with a duplicated column gives identical columns
        out2 = op @ torch.stack([v[:, 0], v[:, 0], v[:, 1]], dim=1)
        torch.testing.assert_close(out2[:, 0], out2[:, 1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out2[:, 0], out[:, 0], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# error paths


def test_error_wrong_vector_shapes():
    model, shape = make_model("mlp_tanh")
    op = GGN(model, nn.MSELoss(), make_data(model, shape, "mse"))
    p = op.shape[0]
    with pytest.raises(ValueError, match="rows"):
        op @ torch.zeros(p + 1, dtype=DT)
    with pytest.raises(ValueError, match="expected a list of 4"):
        op @ [torch.zeros(5, 4, dtype=DT)]
    with pytest.raises(ValueError, match="shape"):
        op @ [
            torch.zeros(4, 5, dtype=DT),
            torch.zeros(5, dtype=DT),
            torch.zeros(3, 5, dtype=DT),
            torch.zeros(3, dtype=DT),
        ]
    with pytest.raises(ValueError, match="unknown"):
        op @ {"nope": torch.zeros(1, dtype=DT)}
    with pytest.raises(ValueError, match="dtype"):
        op @ torch.zeros(p, dtype=torch.float32)


def test_error_construction():
    model, shape = make_model("mlp_tanh")
    data = make_data(model, shape, "ce")
    with pytest.raises(ValueError, match="unknown parameter name 'foo'"):
        GGN(model, nn.CrossEntropyLoss(), data, params=["foo"])
    with pytest.raises(ValueError, match="reduction='none'"):
        Hessian(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="empty"):
        GGN(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        GGN(model, nn.CrossEntropyLoss(), (b for b in data))
    with pytest.raises(ValueError, match=r"output of shape \(3, 3\).*targets of shape \(3, 2\)"):
        GGN(model, nn.CrossEntropyLoss(), (data[0][0], torch.zeros(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"MSELoss.*\(3, 3\).*\(3, 4\)"):
        GGN(model, nn.MSELoss(), (data[0][0], torch.zeros(3, 4, dtype=DT)))
    with pytest.raises(ValueError, match="mc_samples"):
        Fisher(model, nn.CrossEntropyLoss(), data, mc_samples=0)
    with pytest.raises(TypeError, match="likelihood"):
        Fisher(model, lambda o, y: (o**2).sum(), data)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        GGN(lambda x: x, nn.MSELoss(), data)
    with pytest.raises(TypeError, match="batch 0"):
        GGN(model, nn.MSELoss(), [data[0][0]])


def test_error_non_floating_parameters():
    model, shape = make_model("mlp_tanh")
    model.register_parameter(
        "count", nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    )
    data = make_data(model, shape, "ce")
    with pytest.raises(TypeError, match=r"'count' has dtype torch\.int64"):
        GGN(model, nn.CrossEntropyLoss(), data, params=["count"])


def test_dataloader_data():
    model, _ = make_model("mlp_tanh")
    x = torch.randn(8, 4, dtype=DT)
    y = torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    loss_fn = nn.CrossEntropyLoss()
    torch.testing.assert_close(
        GGN(model, loss_fn, loader).to_dense(),
        GGN(model, loss_fn, (x, y)).to_dense(),
        rtol=RTOL,
        atol=ATOL,
    )
