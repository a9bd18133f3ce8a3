"""CurveBall: algebra against dense float64 oracles, state handling, toy problems."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvlab.func import flatten, linearize, unflatten
from curvlab.func.params import cloned_buffers
from curvlab.optim import CurveBall
from curvlab.optim._common import replay_rng, rng_state

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _cnn_bn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).to(DT)


def _dense(model: nn.Module, loss_fn, x, y, wd: float = 0.0):
    """Dense g, G (GGN) at the model's current parameters (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = flatten([p.detach() for p in model.parameters()])
    buffers = cloned_buffers(model)

    def out_of(w):
        ps = dict(zip(names, unflatten(w, shapes), strict=True))
        return torch.func.functional_call(model, (ps, buffers), (x,))

    out = out_of(w0)
    J = torch.func.jacrev(out_of)(w0).reshape(out.numel(), -1)
    HL = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    gL = torch.func.grad(lambda o: loss_fn(o, y))(out).reshape(-1)
    G = J.T @ HL @ J
    g = J.T @ gL + wd * w0
    return g, G, w0


@pytest.mark.parametrize("which", ["mlp", "mlp_bce", "cnn_bn"])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_delta_z_matches_dense(which, wd):
    model = _cnn_bn() if which == "cnn_bn" else _mlp()
    torch.manual_seed(2)
    if which == "mlp":
        x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
        loss_fn = nn.CrossEntropyLoss()
    elif which == "mlp_bce":  # the auto-encoder study's loss: mean over examples AND outputs
        x, y = torch.randn(5, 3, dtype=DT), torch.rand(5, 3, dtype=DT)
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        x, y = torch.randn(4, 1, 4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
        loss_fn = nn.MSELoss()
    opt = CurveBall(model, loss_fn, damping=0.7, weight_decay=wd)
    opt.counters["steps"] = 3
    opt._set_velocity([torch.randn_like(p) for p in model.parameters()])
    q = opt.quadratic_model(x, y)
    g, G, _ = _dense(model, loss_fn, x, y, wd)
    H = G + (0.7 + wd) * torch.eye(G.shape[0], dtype=DT)
    z = flatten(opt.velocity)
    torch.testing.assert_close(flatten(q["delta_z"]), H @ z + g, rtol=1e-8, atol=1e-12)
    dz = H @ z + g
    A = torch.tensor([[dz @ H @ dz, z @ H @ dz], [z @ H @ dz, z @ H @ z]], dtype=DT)
    torch.testing.assert_close(q["A"], A, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(q["b"], torch.stack([g @ dz, g @ z]), rtol=1e-8, atol=1e-12)


def _setup_random_z():
    model = _mlp()
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = CurveBall(model, loss_fn, damping=0.5, auto_lambda=False)
    opt.counters["steps"] = 1
    opt._set_velocity([0.3 * torch.randn_like(p) for p in model.parameters()])
    g, G, _ = _dense(model, loss_fn, x, y)
    H = G + 0.5 * torch.eye(G.shape[0], dtype=DT)
    return model, opt, x, y, g, H


def test_rho_beta_minimise_quadratic_model_on_grid():
    _, opt, x, y, g, H = _setup_random_z()
    z = flatten(opt.velocity)
    dz = H @ z + g
    opt.step(x, y)
    rho, beta = opt.diagnostics["rho"], opt.diagnostics["beta"]

    def fhat(r, b):
        s = r * z - b * dz
        return g @ s + 0.5 * s @ H @ s

    best = fhat(rho, beta)
    r_grid = torch.linspace(rho - 1, rho + 1, 81, dtype=DT)
    b_grid = torch.linspace(beta - 2 * abs(beta), beta + 2 * abs(beta), 81, dtype=DT)
    grid_min = min(fhat(float(r), float(b)) for r in r_grid for b in b_grid)
    assert best <= grid_min + 1e-12
    # and the update applied is z_new = rho z - beta dz, w += z_new
    torch.testing.assert_close(flatten(opt.velocity), rho * z - beta * dz, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_predicted_change_equals_model_change(lr):
    _, opt, x, y, g, H = _setup_random_z()
    opt.set_hyper("lr", lr)
    opt.auto_lambda = True
    opt.counters["steps"] = 0
    opt.step(x, y)
    s = lr * flatten(opt.velocity)
    expected = g @ s + 0.5 * s @ H @ s
    assert math.isclose(opt.diagnostics["predicted_change"], float(expected), rel_tol=1e-8)
    assert opt.diagnostics["ratio"] is not None


def test_first_step_is_cauchy_step():
    model = _mlp()
    torch.manual_seed(4)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    g, G, w0 = _dense(model, loss_fn, x, y)
    H = G + 1.0 * torch.eye(G.shape[0], dtype=DT)
    opt = CurveBall(model, loss_fn)  # default construction works
    opt.step(x, y)
    assert opt.diagnostics["rho"] == 0.0
    assert math.isclose(opt.diagnostics["beta"], float(g @ g / (g @ H @ g)), rel_tol=1e-8)
    w1 = flatten([p.detach() for p in model.parameters()])
    torch.testing.assert_close(w1, w0 - opt.diagnostics["beta"] * g, rtol=1e-8, atol=1e-12)


def test_two_by_two_solve_by_hand_on_one_weight():
    """y = w x, MSE 'sum' on one example: G = 2x², everything is a scalar and hand-checkable."""
    w = nn.Linear(1, 1, bias=False).to(DT)
    with torch.no_grad():
        w.weight.fill_(0.5)
    x, y = torch.tensor([[2.0]], dtype=DT), torch.tensor([[3.0]], dtype=DT)
    lam = 0.25
    opt = CurveBall(w, nn.MSELoss(reduction="sum"), damping=lam, auto_lambda=False)
    z0 = 0.1
    opt._set_velocity([torch.tensor([[z0]], dtype=DT)])
    g = 2 * (0.5 * 2 - 3) * 2  # dL/dw = 2 (w x - y) x = -8
    h = 2 * 2.0**2 + lam  # Ĥ = 2x² + λ = 8.25
    dz = h * z0 + g
    A = torch.tensor([[dz * h * dz, z0 * h * dz], [z0 * h * dz, z0 * h * z0]], dtype=DT)
    b = torch.tensor([g * dz, g * z0], dtype=DT)
    q = opt.quadratic_model(x, y)
    torch.testing.assert_close(q["A"], A, rtol=1e-12, atol=0)
    torch.testing.assert_close(q["b"], b, rtol=1e-12, atol=0)
    opt.step(x, y)
    # A is singular in 1-D (z ∥ Δz): the minimum-norm solution lands on the Newton step
    # s = ρ z0 − β dz = −g/ĥ, and predicted change −g²/(2ĥ)
    s = opt.diagnostics["rho"] * z0 - opt.diagnostics["beta"] * dz
    assert math.isclose(s, -g / h, rel_tol=1e-10)
    assert math.isclose(float(opt.velocity[0]), -g / h, rel_tol=1e-10)
    assert math.isclose(float(w.weight.detach()), 0.5 - g / h, rel_tol=1e-12)
    assert math.isclose(opt.diagnostics["predicted_change"], -g * g / (2 * h), rel_tol=1e-10)


def test_default_damping_is_the_reference_one():
    opt = CurveBall(_mlp(), nn.BCEWithLogitsLoss())
    assert opt.hyper("damping") == 1.0 and opt.damping_units == "loss"
    assert opt.effective_damping(torch.zeros(7, 3, dtype=DT)) == 1.0


@pytest.mark.parametrize("loss_fn, shape, factor", [
    (nn.BCEWithLogitsLoss(), (6, 3), 1 / 3),   # mean over 6·3 terms: λ/D
    (nn.MSELoss(), (6, 3), 1 / 3),
    (nn.MSELoss(reduction="sum"), (6, 3), 6.0),  # sum over examples: λ·B
    (nn.CrossEntropyLoss(), (6, 3), 1.0),      # batch mean: the reference's own convention
])
def test_damping_per_example_is_loss_damping_rescaled(loss_fn, shape, factor):
    """``damping_units='example'`` = ``'loss'`` with λ·factor: identical trajectories."""
    torch.manual_seed(14)
    x = torch.randn(shape[0], 3, dtype=DT)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (shape[0],))
    else:
        y = torch.rand(shape, dtype=DT)
    model_a, model_b = _mlp(), _mlp()
    opt_a = CurveBall(model_a, loss_fn, damping=0.6, damping_units="example",
                      lambda_interval=2)
    opt_b = CurveBall(model_b, loss_fn, damping=0.6 * factor, lambda_interval=2)
    assert math.isclose(opt_a.effective_damping(model_a(x), y), 0.6 * factor)
    for _ in range(6):
        opt_a.step(x, y)
        opt_b.step(x, y)
        # the λ rule moves the stored damping by the same factors in both units
        assert math.isclose(opt_a.hyper("damping") * factor, opt_b.hyper("damping"),
                            rel_tol=1e-12)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_damping_units_errors():
    with pytest.raises(ValueError, match="damping_units"):
        CurveBall(_mlp(), nn.MSELoss(), damping_units="pixel")
    with pytest.raises(ValueError, match="damping_units='example'"):
        CurveBall(_mlp(), lambda out, y: (out - y).pow(2).sum(), damping_units="example")


def test_zero_curvature_is_heavy_ball():
    model = _mlp()
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    loss_fn = nn.CrossEntropyLoss()
    opt = CurveBall(model, loss_fn, damping=0.0, momentum=0.9, beta=0.1, auto_lambda=False)
    opt.rule.hessian_vp = lambda out, target, v: torch.zeros_like(v)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
        opt.step(x, y)
        sgd.zero_grad()
        loss_fn(ref(x), y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_lambda_moves_in_right_direction():
    opt = CurveBall(_mlp(), nn.CrossEntropyLoss(), damping=2.0)
    omega = 0.999**5
    opt._adapt_lambda(0.1)  # model too optimistic -> more damping
    assert math.isclose(opt.hyper("damping"), 2.0 / omega)
    opt.set_hyper("damping", 2.0)
    opt._adapt_lambda(3.0)  # better than predicted -> less damping
    assert math.isclose(opt.hyper("damping"), 2.0 * omega)
    opt.set_hyper("damping", 2.0)
    opt._adapt_lambda(1.0)
    assert opt.hyper("damping") == 2.0


def test_lambda_test_only_every_interval_steps():
    model = _mlp()
    torch.manual_seed(6)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    opt = CurveBall(model, nn.CrossEntropyLoss(), lambda_interval=3)
    tested = []
    for _ in range(7):
        opt.step(x, y)
        tested.append(opt.diagnostics["ratio"] is not None)
    assert tested == [True, False, False, True, False, False, True]
    assert opt.counters["forward"] == 7 + 3


def test_fixed_rho_beta_never_overwritten():
    model = _mlp()
    torch.manual_seed(7)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    opt = CurveBall(model, nn.CrossEntropyLoss(), momentum=0.5)
    for _ in range(6):
        opt.step(x, y)
        assert opt.diagnostics["rho"] == 0.5
    assert opt.hyper("momentum") == 0.5 and opt.hyper("beta") is None
    opt2 = CurveBall(_mlp(), nn.CrossEntropyLoss(), momentum=0.8, beta=0.05)
    for _ in range(6):
        opt2.step(x, y)
        assert (opt2.diagnostics["rho"], opt2.diagnostics["beta"]) == (0.8, 0.05)
    assert opt2.state_dict()["param_groups"][0]["momentum"] == 0.8


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(8)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)
    )


def test_lambda_evaluation_touches_bn_stats_once_and_reuses_dropout_masks():
    model = _bn_dropout_net()
    ref = copy.deepcopy(model)
    torch.manual_seed(9)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    opt = CurveBall(model, nn.CrossEntropyLoss())
    opt.step(x, y)  # count 0: lambda test runs
    assert opt.counters["forward"] == 2
    ref(x)  # one ordinary training forward
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    # the re-evaluation replays the forward's RNG state: same dropout masks
    rng = rng_state([x])
    with replay_rng(rng):
        out1 = linearize(model, opt.params, x).output.detach()
    out2 = opt._reevaluate(x, rng)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.rand(1)  # advance the RNG: a fresh forward draws different masks
    out3 = linearize(model, opt.params, x).output.detach()
    assert not torch.equal(out1, out3)


def test_resume_is_bit_exact():
    torch.manual_seed(10)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(9)]
    model_a = _bn_dropout_net()
    model_a[3].p = 0.0
    model_b = copy.deepcopy(model_a)
    opt_a = CurveBall(model_a, nn.CrossEntropyLoss(), lambda_interval=2, weight_decay=1e-3)
    for x, y in batches:
        opt_a.step(x, y)
    opt_b = CurveBall(model_b, nn.CrossEntropyLoss(), lambda_interval=2, weight_decay=1e-3)
    for x, y in batches[:4]:
        opt_b.step(x, y)
    saved_model, saved_opt = copy.deepcopy(model_b.state_dict()), opt_b.state_dict()
    model_c = _bn_dropout_net()
    model_c[3].p = 0.0
    model_c.load_state_dict(saved_model)
    opt_c = CurveBall(model_c, nn.CrossEntropyLoss(), lambda_interval=2, weight_decay=1e-3)
    opt_c.load_state_dict(saved_opt)
    for x, y in batches[4:]:
        opt_c.step(x, y)
    for p, q in zip(model_a.state_dict().values(), model_c.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert opt_a.hyper("damping") == opt_c.hyper("damping") and opt_a.steps == opt_c.steps
    assert all(torch.equal(a, c) for a, c in zip(opt_a.velocity, opt_c.velocity, strict=True))
    assert opt_a.counters == opt_c.counters


def test_nan_input_skips_and_leaves_everything_untouched():
    model = _bn_dropout_net()
    torch.manual_seed(11)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = CurveBall(model, nn.CrossEntropyLoss())
    opt.step(x, y)
    before = copy.deepcopy(model.state_dict())
    state = opt.state_dict()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loss = opt.step(bad, y)
    assert not torch.isfinite(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = opt.state_dict()
    assert after["param_groups"][0]["damping"] == state["param_groups"][0]["damping"]
    assert after["curvlab"]["counters"]["steps"] == state["curvlab"]["counters"]["steps"]
    assert all(torch.equal(a["z"], b["z"])
               for a, b in zip(after["state"].values(), state["state"].values(), strict=True))
    assert opt.counters["skipped_steps"] == 1


def test_bad_output_shape_raises_with_shapes():
    model = nn.Linear(3, 2)
    opt = CurveBall(model, nn.MSELoss())
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        opt.step(torch.randn(4, 3), torch.randn(4, 3))


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="lambda_interval"):
        CurveBall(nn.Linear(2, 2), nn.MSELoss(), lambda_interval=0)
    with pytest.raises(TypeError, match="momentum"):
        CurveBall(nn.Linear(2, 2), nn.MSELoss(), momentum="auto")
    with pytest.raises(ValueError, match="targets is None"):
        CurveBall(nn.Linear(2, 2), nn.MSELoss()).step(torch.randn(3, 2))


def test_cnn_with_bn_pool_dropout_trains():
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    opt = CurveBall(model, nn.CrossEntropyLoss())
    losses = [float(opt.step(x, y)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    assert opt.counters["skipped_steps"] == 0


def _iters_to_tol(step, tol=1e-4, budget=2000) -> int:
    for it in range(budget):
        if float(step()) < tol:
            return it
    return budget


def test_solves_deterministic_rosenbrock():
    from curvlab.problems.rosenbrock import StochasticRosenbrock

    prob = StochasticRosenbrock(None, x0_noise=0.0)
    opt = CurveBall(
        prob.make_model(), prob.loss_fn, damping=0.1, lr=0.5, auto_lambda=False, engine="functional"
    )
    inputs, targets = prob.draw_batch(None)
    it = _iters_to_tol(lambda: opt.step(inputs, targets))
    assert it < 2000
    # same through the residual entry point
    w = torch.tensor([-0.25, -0.25], dtype=DT)

    def residuals(p, eps):
        return prob.residuals(p[0], eps)

    opt2 = CurveBall.for_residuals(residuals, [w], damping=0.1, lr=0.5, auto_lambda=False)
    assert _iters_to_tol(lambda: opt2.step(1.0)) == it


def test_solves_rahimi_recht():
    from curvlab.problems.rahimi_recht import make_rahimi_recht

    prob = make_rahimi_recht(seed=0)
    opt = CurveBall(prob.model, prob.loss_fn, damping=1.0, lr=1.0, auto_lambda=False)
    assert _iters_to_tol(lambda: opt.step(prob.x, prob.y), budget=1000) < 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = _cnn_bn()
    model_gpu = copy.deepcopy(model).cuda()
    torch.manual_seed(13)
    x, y = torch.randn(4, 1, 4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    opt = CurveBall(model, nn.MSELoss())
    opt_gpu = CurveBall(model_gpu, nn.MSELoss())
    for _ in range(3):
        opt.step(x, y)
        opt_gpu.step(x.cuda(), y.cuda())
    for p, q in zip(model.parameters(), model_gpu.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-8, atol=1e-10)
