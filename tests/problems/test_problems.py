"""Tests for curvlab.problems: toy problems, losses and network builders."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlab.problems import (
    TWO_D_FUNCTIONS,
    StochasticRosenbrock,
    autoencoder,
    basic_cifar_net,
    benchmark_mlp,
    bernoulli_nll_loss,
    cnn_3c3d,
    deterministic_rosenbrock,
    haar_orthogonal,
    make_noisy_two_d,
    make_quadratic_deep,
    make_rahimi_recht,
    mean_output_loss,
    reconstruction_sq_error,
    reset_parameters_,
    rosenbrock,
    rosenbrock_gradient,
    rosenbrock_residuals,
    small_cnn,
    small_mlp,
    sparse_init_,
    sum_of_squares_loss,
)

F64 = torch.float64

# --------------------------------------------------------------------------- Rosenbrock


def test_rosenbrock_minimum_and_values():
    one = torch.ones(2, dtype=F64)
    for eps in (0.0, 0.3, 1.0, 4.0):
        assert float(rosenbrock(one, eps)) == 0.0
    theta = torch.tensor([0.5, -1.0], dtype=F64)
    # (1 - 0.5)^2 + 100 * eps^2 * (-1 - 0.25)^2
    assert float(rosenbrock(theta, 2.0)) == pytest.approx(0.25 + 100 * 4 * 1.5625)


def test_rosenbrock_residual_form_squares_to_loss():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(50, 2, generator=gen, dtype=F64) * 2
    eps = torch.rand(50, generator=gen, dtype=F64) * 3
    r = rosenbrock_residuals(theta, eps)
    assert r.shape == (50, 2)
    torch.testing.assert_close(r.pow(2).sum(-1), rosenbrock(theta, eps), rtol=1e-14, atol=0)
    assert torch.equal(rosenbrock_residuals(theta[0], 1.0)[1], 1 - theta[0, 0])


@pytest.mark.parametrize("eps", [1.0, 0.37, 2.5])
def test_rosenbrock_gradient_autograd_vs_closed_form(eps: float):
    theta = torch.tensor([-0.7, 1.3], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(rosenbrock(theta, eps), theta)
    torch.testing.assert_close(grad, rosenbrock_gradient(theta.detach(), eps), rtol=1e-13, atol=0)


def test_stochastic_rosenbrock_noise_statistics_and_determinism():
    s = 3.0
    prob = StochasticRosenbrock(noise_scale=s)
    gen = torch.Generator().manual_seed(0)
    eps = torch.stack([prob.sample_eps(gen) for _ in range(4000)])
    assert float(eps.min()) >= 0.0 and float(eps.max()) <= s
    # eps ~ s U[0,1]: E[eps] = s/2, E[eps^2] = s^2/3; 4000 draws -> std errors ~0.014 and ~0.05
    assert float(eps.mean()) == pytest.approx(s / 2, abs=0.07)
    assert float((eps**2).mean()) == pytest.approx(s**2 / 3, abs=0.25)
    again = StochasticRosenbrock(noise_scale=s)
    gen2 = torch.Generator().manual_seed(0)
    assert torch.equal(torch.stack([again.sample_eps(gen2) for _ in range(4000)]), eps)
    with pytest.raises(ValueError, match="generator"):
        prob.sample_eps(None)
    det = StochasticRosenbrock(noise_scale=0)
    assert det.deterministic and float(det.sample_eps(None)) == 1.0


def test_stochastic_rosenbrock_start_point():
    prob = StochasticRosenbrock(noise_scale=1.0)
    gen = torch.Generator().manual_seed(1)
    starts = torch.stack([prob.initial_point(gen) for _ in range(200)])
    assert torch.equal(starts[:, 0], starts[:, 1])  # same offset on both coordinates
    assert float(starts.min()) >= -0.5 and float(starts.max()) <= 0.0
    assert float(starts.std()) > 0.1
    assert deterministic_rosenbrock().initial_point().tolist() == [-0.25, -0.25]
    with pytest.raises(ValueError, match="generator"):
        prob.initial_point(None)


def test_rosenbrock_model_batches_same_and_fresh_noise():
    prob = StochasticRosenbrock(noise_scale=2.0)
    gen = torch.Generator().manual_seed(2)
    model = prob.make_model(torch.tensor([0.2, 0.9], dtype=F64))
    batch = prob.draw_batch(gen)
    loss1 = prob.loss_fn(model(batch[0]), batch[1])
    torch.testing.assert_close(loss1, prob.loss(model.theta, batch[0][0, 0]))
    # re-using the batch reproduces the loss exactly (same noise) ...
    assert torch.equal(prob.loss_fn(model(batch[0]), batch[1]), loss1)
    assert torch.equal(prob.loss_fn(*_eval(model, prob.batch(batch[0][0, 0]))), loss1)
    # ... and a new draw gives different noise
    assert not torch.equal(prob.draw_batch(gen)[0], batch[0])
    assert [p.shape for p in model.parameters()] == [torch.Size([2])]


def _eval(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    return model(batch[0]), batch[1]


def test_deterministic_rosenbrock_solved_by_gauss_newton_on_residuals():
    """The residual model + ls loss is a proper least-squares problem: damped Gauss–Newton
    (Levenberg–Marquardt with fixed damping) reaches the 1e-4 tolerance."""
    prob = deterministic_rosenbrock()
    model = prob.make_model()
    inputs, targets = prob.draw_batch(None)
    theta = model.theta.detach().clone()
    for _ in range(100):
        res = lambda th: functional_call(model, {"theta": th}, (inputs,))[0]  # noqa: E731
        r, J = res(theta), jacrev(res)(theta)
        theta = theta - torch.linalg.solve(J.T @ J + 1e-3 * torch.eye(2, dtype=F64), J.T @ r)
        loss = prob.loss_fn(functional_call(model, {"theta": theta}, (inputs,)), targets)
        if prob.converged(loss):
            break
    assert prob.converged(loss)
    assert torch.allclose(theta, torch.ones(2, dtype=F64), atol=1e-2)


# --------------------------------------------------------------------------- quadratic_deep


def test_quadratic_deep_hessian_is_q_exactly():
    prob = make_quadratic_deep()
    x, t = prob.dataset.train
    xb, tb = x[:128], t[:128]
    theta0 = prob.model.theta.detach()

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        return prob.loss_fn(functional_call(prob.model, {"theta": theta}, (xb,)), tb)

    H = hessian(loss_of)(theta0)
    torch.testing.assert_close(H, prob.Q, rtol=1e-8, atol=1e-12)
    (g,) = torch.autograd.grad(prob.loss_fn(prob.model(xb), tb), prob.model.theta)
    torch.testing.assert_close(g, prob.Q @ (theta0 - xb.mean(0)), rtol=1e-10, atol=1e-12)


def test_quadratic_deep_spectrum_rotation_and_data():
    prob = make_quadratic_deep()
    lam = prob.eigenvalues
    assert lam.shape == (100,)
    assert float(lam[:90].min()) >= 0 and float(lam[:90].max()) < 1
    assert float(lam[90:].min()) >= 30 and float(lam[90:].max()) < 60
    torch.testing.assert_close(
        torch.linalg.eigvalsh(prob.Q), torch.sort(lam).values, rtol=1e-10, atol=1e-12
    )
    R = prob.rotation
    torch.testing.assert_close(R.T @ R, torch.eye(100, dtype=F64), rtol=0, atol=1e-12)
    x_tr, x_te = prob.dataset.x_train, prob.dataset.x_test
    assert x_tr.shape == (1000, 100) and x_te.shape == (1000, 100)
    assert float(x_tr.std()) == pytest.approx(0.6, abs=0.01)
    assert not torch.equal(x_tr, x_te)
    assert torch.equal(prob.model.theta.detach(), torch.ones(100, dtype=F64))
    assert [n for n, _ in prob.model.named_parameters()] == ["theta"]
    again = make_quadratic_deep()
    assert torch.equal(again.Q, prob.Q) and torch.equal(again.dataset.x_train, x_tr)
    # empirical loss at init is close to the expected loss 1/2 1^T Q 1 + 1/2 0.36 tr Q
    with torch.no_grad():
        emp = prob.loss_fn(prob.model(x_tr), prob.dataset.y_train)
        assert float(emp) == pytest.approx(float(prob.expected_loss()), rel=0.1)


def test_haar_orthogonal_is_seeded_and_proper():
    a, b = haar_orthogonal(6, seed=3), haar_orthogonal(6, seed=3)
    assert (a == b).all() and not (a == haar_orthogonal(6, seed=4)).all()
    with pytest.raises(ValueError, match="dim"):
        haar_orthogonal(0, seed=0)


# --------------------------------------------------------------------------- Rahimi–Recht


def test_rahimi_recht_curveball_variant():
    prob = make_rahimi_recht("curveball", seed=0)
    assert prob.x.shape == (1000, 6) and prob.y.shape == (1000, 10) and prob.A.shape == (10, 6)
    w1, w2 = prob.model[0].weight, prob.model[1].weight
    assert w1.shape == (10, 6) and w2.shape == (10, 10)
    assert prob.model[0].bias is None and prob.model[1].bias is None
    torch.testing.assert_close(prob.row_scales, torch.linspace(1, 1e-5, 10, dtype=F64))
    ratio = prob.A / prob.row_scales[:, None]  # rows scaled uniform [0, 1] matrices
    assert float(ratio.min()) >= 0 and float(ratio.max()) <= 1
    assert float(prob.A[-1].abs().max()) <= 1e-5
    torch.testing.assert_close(prob.y, prob.x @ prob.A.T)
    assert 0.05 < float(w1.detach().std()) < 0.25 and 0.05 < float(w2.detach().std()) < 0.15
    loss = prob.loss()
    manual = ((prob.model(prob.x) - prob.y) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(prob.end_to_end() @ prob.x[0], prob.model(prob.x[:1])[0])


def test_rahimi_recht_recht_variant_and_determinism():
    prob = make_rahimi_recht("recht", seed=1)
    assert prob.x.shape == (1000, 10) and prob.A.shape == (10, 10)
    assert prob.model[0].weight.shape == (6, 10) and prob.model[1].weight.shape == (10, 6)
    manual = ((prob.model(prob.x) - prob.y) ** 2).sum()
    torch.testing.assert_close(prob.loss(), manual)
    again = make_rahimi_recht("recht", seed=1)
    assert torch.equal(again.A, prob.A) and torch.equal(again.model[0].weight, prob.model[0].weight)
    assert not torch.equal(make_rahimi_recht("recht", seed=2).A, prob.A)
    f32 = make_rahimi_recht("recht", seed=1, dtype=torch.float32)
    assert f32.x.dtype == torch.float32 and f32.model[0].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="variant"):
        make_rahimi_recht("deep")


# --------------------------------------------------------------------------- 2-D problems


def test_two_d_functions_minima_and_starts():
    for fn in TWO_D_FUNCTIONS.values():
        for point in fn.minima:
            value = float(fn.f(torch.tensor(point, dtype=F64)))
            assert value == pytest.approx(fn.min_value, abs=1e-5)
    assert TWO_D_FUNCTIONS["branin"].min_value == pytest.approx(0.397887, abs=1e-6)
    starts = {name: fn.start for name, fn in TWO_D_FUNCTIONS.items()}
    assert starts == {"rosenbrock": (-0.5, 1.5), "beale": (-4.5, 4.5), "branin": (2.5, 12.5)}


@pytest.mark.parametrize("name", ["rosenbrock", "beale", "branin"])
def test_noisy_two_d_problem(name: str):
    prob = make_noisy_two_d(name)
    assert prob.x_train.shape == (10000, 2) and prob.y_train.shape == (10000,)
    assert abs(float(prob.x_train.mean())) < 0.03 and abs(float(prob.x_train.std()) - 1) < 0.03
    assert torch.equal(prob.x_train, make_noisy_two_d(name).x_train)  # seed 42 by default
    theta = prob.model.theta
    assert theta.tolist() == list(TWO_D_FUNCTIONS[name].start)
    out = prob.model(prob.x_train[:5])
    torch.testing.assert_close(out, prob.objective() + prob.x_train[:5] @ theta)
    test_loss = prob.loss_fn(prob.model(prob.x_test), prob.y_test)
    torch.testing.assert_close(test_loss, prob.objective())
    assert prob.distance_to_minimum() > 0


def test_noisy_two_d_rejects_unknown():
    with pytest.raises(ValueError, match="known: rosenbrock, beale, branin"):
        make_noisy_two_d("himmelblau")


# --------------------------------------------------------------------------- losses


def test_losses():
    out, tgt = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 2)
    assert float(sum_of_squares_loss(out, tgt)) == 7.0
    assert float(sum_of_squares_loss(out, tgt, reduction="sum")) == 14.0
    with pytest.raises(ValueError, match="same shape"):
        sum_of_squares_loss(out, torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        sum_of_squares_loss(out, tgt, reduction="none")
    logits, target = torch.randn(3, 5), torch.rand(3, 5)
    manual = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 3
    torch.testing.assert_close(bernoulli_nll_loss(logits, target), manual)
    torch.testing.assert_close(
        reconstruction_sq_error(logits, target),
        ((torch.sigmoid(logits) - target) ** 2).sum() / 3,
    )
    assert float(mean_output_loss(torch.tensor([1.0, 2.0]), None)) == 1.5


# --------------------------------------------------------------------------- networks

_ALLOWED = (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.Sigmoid,
    nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout,
)  # fmt: skip


def _assert_plain_sequential(net: nn.Module) -> None:
    assert type(net) is nn.Sequential
    assert all(isinstance(m, _ALLOWED) for m in net), [type(m).__name__ for m in net]


def test_benchmark_mlp():
    net = benchmark_mlp(generator=torch.Generator().manual_seed(0))
    _assert_plain_sequential(net)
    sizes = [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]
    assert sizes == [(784, 1000), (1000, 500), (500, 250), (250, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in net) == 3
    assert net(torch.zeros(3, 784)).shape == (3, 10)


@pytest.mark.parametrize(
    ("in_channels", "image_size", "flat"), [(3, 32, 2048), (1, 28, 2048), (1, 8, 128)]
)
def test_cnn_3c3d_shapes(in_channels: int, image_size: int, flat: int):
    net = cnn_3c3d(in_channels, 10, image_size, generator=torch.Generator().manual_seed(0))
    _assert_plain_sequential(net)
    fcs = [m for m in net if isinstance(m, nn.Linear)]
    assert fcs[0].in_features == flat and [m.out_features for m in fcs] == [512, 256, 10]
    convs = [m.out_channels for m in net if isinstance(m, nn.Conv2d)]
    assert convs == [64, 96, 128]
    assert net(torch.zeros(2, in_channels, image_size, image_size)).shape == (2, 10)
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in net if isinstance(m, nn.Linear))


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize(
    ("in_channels", "image_size", "width"), [(3, 32, 1.0), (1, 8, 0.5), (1, 28, 0.25)]
)
def test_basic_cifar_net_shapes(batch_norm: bool, in_channels: int, image_size: int, width):
    net = basic_cifar_net(
        batch_norm, in_channels, 10, image_size, width, generator=torch.Generator().manual_seed(0)
    )
    _assert_plain_sequential(net)
    assert net(torch.randn(4, in_channels, image_size, image_size)).shape == (4, 10)
    bns = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (4 if batch_norm else 0)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert convs[-1].kernel_size == (1, 1) and len(convs) == 5
    if batch_norm:  # BN comes right after each of the first four convolutions, before ReLU
        for i, m in enumerate(net):
            if isinstance(m, nn.BatchNorm2d):
                assert isinstance(net[i - 1], nn.Conv2d) and isinstance(net[i + 1], nn.ReLU)
        assert bns[0].eps == 1e-4
    if image_size == 32 and width == 1.0:
        assert [c.out_channels for c in convs] == [32, 32, 64, 64, 10]
        assert convs[3].kernel_size == (4, 4)
        assert 0.005 < float(convs[0].weight.detach().std()) < 0.015
        assert 0.04 < float(convs[1].weight.detach().std()) < 0.06


@pytest.mark.parametrize(
    ("kind", "sizes"),
    [
        ("mnist", [784, 1000, 500, 250, 30, 250, 500, 1000, 784]),
        ("curves", [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]),
    ],
)
def test_autoencoder_architecture(kind: str, sizes: list[int]):
    net = autoencoder(kind, generator=torch.Generator().manual_seed(0))
    _assert_plain_sequential(net)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [linears[0].in_features] + [m.out_features for m in linears] == sizes
    code = sizes.index(min(sizes)) - 1  # index among linears of the code layer
    for i, m in enumerate(net):
        if isinstance(m, nn.Linear):
            j = linears.index(m)
            follows = net[i + 1] if i + 1 < len(net) else None
            if j == code or j == len(linears) - 1:  # linear code layer, logits output
                assert not isinstance(follows, nn.Sigmoid)
            else:
                assert isinstance(follows, nn.Sigmoid)
    assert net(torch.rand(2, 784)).shape == (2, 784)
    for m in linears:  # Martens' sparse init
        nz = (m.weight != 0).sum(dim=1)
        assert bool((nz == min(15, m.in_features)).all())
        assert float(m.bias.detach().abs().sum()) == 0.0


def test_autoencoder_width_scaling():
    net = autoencoder("curves", width=0.1, generator=torch.Generator().manual_seed(0))
    outs = [m.out_features for m in net if isinstance(m, nn.Linear)]
    assert outs == [40, 20, 10, 5, 2, 6, 2, 5, 10, 20, 40, 784]
    assert net(torch.rand(3, 784)).shape == (3, 784)
    with pytest.raises(ValueError, match="kind"):
        autoencoder("faces")


def test_sparse_init_exact_counts_and_determinism():
    net = nn.Sequential(nn.Linear(40, 7), nn.Tanh(), nn.Linear(7, 3), nn.Conv2d(2, 5, 3))
    sparse_init_(net, generator=torch.Generator().manual_seed(0))
    assert (net[0].weight != 0).sum(1).tolist() == [15] * 7
    assert (net[2].weight != 0).sum(1).tolist() == [7] * 3  # fan-in below 15: all nonzero
    assert (net[3].weight.reshape(5, -1) != 0).sum(1).tolist() == [15] * 5
    nonzero = net[0].weight[net[0].weight != 0]
    assert 0.6 < float(nonzero.detach().std()) < 1.5
    other = sparse_init_(
        nn.Sequential(nn.Linear(40, 7), nn.Tanh(), nn.Linear(7, 3), nn.Conv2d(2, 5, 3)),
        generator=torch.Generator().manual_seed(0),
    )
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters()))
    sparse_init_(net[0], num_nonzero=3, generator=torch.Generator().manual_seed(1))
    assert (net[0].weight != 0).sum(1).tolist() == [3] * 7
    with pytest.raises(TypeError, match="no Linear"):
        sparse_init_(nn.Tanh())


def test_small_networks_and_seeded_init():
    mlp = small_mlp(4, (8, 6), 3, activation="relu", generator=torch.Generator().manual_seed(0))
    _assert_plain_sequential(mlp)
    assert mlp(torch.zeros(2, 4)).shape == (2, 3)
    same = small_mlp(4, (8, 6), 3, activation="relu", generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), same.parameters()))
    cnn = small_cnn(1, 4, image_size=8, channels=(3, 5), generator=torch.Generator().manual_seed(0))
    _assert_plain_sequential(cnn)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    assert any(isinstance(m, nn.MaxPool2d) for m in cnn) and isinstance(cnn[-2], nn.Flatten)
    lin = reset_parameters_(nn.Linear(9, 2), torch.Generator().manual_seed(0))
    assert (
        float(lin.weight.detach().abs().max()) <= 1 / 3
        and float(lin.bias.detach().abs().max()) <= 1 / 3
    )
    with pytest.raises(ValueError, match="activation"):
        small_mlp(activation="gelu")
    with pytest.raises(ValueError, match="too small"):
        small_cnn(image_size=2, channels=(2, 2))


def test_networks_reject_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        basic_cifar_net(width=0)
    with pytest.raises(ValueError, match="image_size"):
        cnn_3c3d(image_size=0)
    with pytest.raises(TypeError, match="generator"):
        benchmark_mlp(generator=0)  # type: ignore[arg-type]
    assert math.isfinite(float(benchmark_mlp()(torch.zeros(1, 784)).detach().sum()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_problems_on_cuda():
    prob = make_quadratic_deep(device="cuda")
    x, t = prob.dataset.train
    assert x.is_cuda and prob.model.theta.is_cuda and prob.loss_fn.Q.is_cuda
    float(prob.loss_fn(prob.model(x), t).detach())
    rr = make_rahimi_recht(device="cuda", dtype=torch.float32)
    assert rr.loss().is_cuda
    ros = StochasticRosenbrock(noise_scale=1.0, device="cuda")
    inputs, _ = ros.draw_batch(torch.Generator().manual_seed(0))
    assert inputs.is_cuda and ros.make_model().theta.is_cuda
    net = sparse_init_(nn.Linear(30, 4).cuda(), generator=torch.Generator().manual_seed(0))
    assert (net.weight != 0).sum(1).tolist() == [15] * 4
