"""Tests for curvlab.linalg against dense ground truth (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab.linalg import (
    cg,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    lanczos_tridiagonal,
    spectral_density,
)
from curvlab.operators.base import DenseOperator, IdentityOperator

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym_matrix(p: int, seed: int = 0, spd: bool = True) -> torch.Tensor:
    """Random symmetric matrix with well-spread eigenvalues (SPD: in [0.1, 10])."""
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    if spd:
        evals = torch.logspace(-1, 1, p, dtype=F64)
    else:
        evals = torch.linspace(-5, 3, p, dtype=F64) + 0.01 * torch.rand(p, generator=g, dtype=F64)
    m = q @ torch.diag(evals) @ q.T
    return (m + m.T) / 2


class NonSquare:
    """Duck-typed operator with a non-square shape."""

    shape = (3, 4)
    dtype = F64
    device = torch.device("cpu")

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise AssertionError("must not be called")


ALL_FUNCS = [
    lambda op: lanczos(op, k=1),
    lambda op: lanczos_tridiagonal(op, 1),
    lambda op: hutchinson_trace(op, 1),
    lambda op: hutchinson_diagonal(op, 1),
    lambda op: cg(op, torch.ones(3, dtype=F64)),
    lambda op: spectral_density(op, 1, 1),
]


@pytest.mark.parametrize("func", ALL_FUNCS)
def test_operator_checks(func) -> None:
    with pytest.raises(ValueError, match=r"square \(P, P\), got shape \(3, 4\)"):
        func(NonSquare())
    with pytest.raises(TypeError, match=r"has no \.shape"):
        func([[1.0]])


@pytest.mark.parametrize("func", [f for i, f in enumerate(ALL_FUNCS) if i not in (2, 3)])
def test_nonsymmetric_rejected(func) -> None:
    op = DenseOperator(torch.triu(torch.ones(3, 3, dtype=F64)))
    assert op.symmetric is False
    with pytest.raises(ValueError, match="symmetric=False"):
        func(op)


def test_plain_tensor_works_as_duck_operator() -> None:
    m = sym_matrix(6)
    vals, _ = lanczos(m, k=2, num_iter=6, generator=gen())
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(m)[-2:], rtol=1e-8, atol=0)


# ------------------------------------------------------------------ Lanczos


@pytest.mark.parametrize("spd", [True, False])
@pytest.mark.parametrize(("which", "k"), [("largest", 4), ("smallest", 3), ("both", 5)])
def test_lanczos_exact_with_full_iterations(spd: bool, which: str, k: int) -> None:
    p = 30
    m = sym_matrix(p, seed=1, spd=spd)
    op = DenseOperator(m)
    vals, vecs = lanczos(op, k=k, which=which, num_iter=p, generator=gen(2))
    ref = torch.linalg.eigvalsh(m)
    expected = {
        "largest": ref[-k:],
        "smallest": ref[:k],
        "both": torch.cat([ref[: k // 2], ref[-(k - k // 2) :]]),
    }[which]
    torch.testing.assert_close(vals, expected, rtol=1e-8, atol=1e-12)
    assert vals.dtype == F64 and vecs.shape == (p, k)
    assert torch.all(vals[1:] >= vals[:-1])  # ascending
    residual = torch.linalg.matrix_norm(m @ vecs - vecs * vals, ord=2)
    assert residual <= 1e-8 * torch.linalg.matrix_norm(m, ord=2)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)


def test_lanczos_repeated_eigenvalues_need_restarts() -> None:
    d = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 5.0, 7.0, 7.0], dtype=F64)
    op = DenseOperator(torch.diag(d))
    vals, vecs = lanczos(op, k=8, num_iter=8, generator=gen(0))
    torch.testing.assert_close(vals, torch.sort(d).values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(8, dtype=F64), atol=1e-10, rtol=0)
    vals_i, _ = lanczos(IdentityOperator(5, F64), k=3, num_iter=5, generator=gen(1))
    torch.testing.assert_close(vals_i, torch.ones(3, dtype=F64))
    zero = 0 * IdentityOperator(4, F64)
    torch.testing.assert_close(
        lanczos(zero, k=2, num_iter=4).eigenvalues, torch.zeros(2, dtype=F64)
    )


def test_lanczos_tol_stops_early_and_is_accurate() -> None:
    p = 60
    evals = torch.cat([torch.linspace(0, 1, p - 3, dtype=F64), torch.tensor([5.0, 8.0, 12.0])])
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen(3), dtype=F64))
    m = q @ torch.diag(evals) @ q.T
    calls = 0

    class Counting(DenseOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return super()._matmat(M)

    op = Counting((m + m.T) / 2)
    vals, vecs = lanczos(op, k=3, num_iter=p, tol=1e-10, generator=gen(4))
    assert calls < p
    torch.testing.assert_close(vals, evals[-3:], rtol=1e-8, atol=0)
    res = torch.linalg.vector_norm(op.matrix @ vecs - vecs * vals, dim=0)
    assert torch.all(res <= 1e-8 * 12)


def test_lanczos_defaults_float32_and_reproducibility() -> None:
    m = sym_matrix(20, seed=5)
    a = lanczos(DenseOperator(m), generator=gen(7))  # default k=6, num_iter = P
    b = lanczos(DenseOperator(m), generator=gen(7))
    assert a.eigenvalues.shape == (6,)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    torch.testing.assert_close(a.eigenvalues, torch.linalg.eigvalsh(m)[-6:], rtol=1e-8, atol=0)
    v32, _ = lanczos(DenseOperator(m.float()), k=2, num_iter=20, generator=gen(7))
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), torch.linalg.eigvalsh(m)[-2:], rtol=1e-4, atol=0)
    v0 = torch.ones(20, dtype=F64)
    c = lanczos(DenseOperator(m), k=2, num_iter=20, v0=v0)
    torch.testing.assert_close(c.eigenvalues, torch.linalg.eigvalsh(m)[-2:], rtol=1e-8, atol=0)


def test_lanczos_argument_errors() -> None:
    op = DenseOperator(sym_matrix(5))
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\], got 0"):
        lanczos(op, k=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\], got 6"):
        lanczos(op, k=6)
    with pytest.raises(TypeError, match="k must be an int"):
        lanczos(op, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(op, k=2, which="LM")
    with pytest.raises(ValueError, match=r"num_iter must be in \[3, 5\], got 2"):
        lanczos(op, k=3, num_iter=2)
    with pytest.raises(ValueError, match=r"num_iter must be in \[3, 5\], got 9"):
        lanczos(op, k=3, num_iter=9)
    with pytest.raises(ValueError, match="tol must be > 0"):
        lanczos(op, k=1, tol=-1.0)
    with pytest.raises(ValueError, match=r"v0 must have shape \(5,\)"):
        lanczos(op, k=1, v0=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"v0 has dtype torch\.float32"):
        lanczos(op, k=1, v0=torch.ones(5))
    with pytest.raises(ValueError, match="non-zero finite"):
        lanczos(op, k=1, v0=torch.zeros(5, dtype=F64))
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        lanczos(op, k=1, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_iter must be in \[1, 5\]"):
        lanczos_tridiagonal(op, 0)
    with pytest.raises(TypeError, match="restart_on_breakdown must be a bool"):
        lanczos_tridiagonal(op, 2, restart_on_breakdown=1)  # type: ignore[arg-type]


def test_lanczos_tridiagonal_decomposition() -> None:
    p, m_steps = 25, 10
    m = sym_matrix(p, seed=8, spd=False)
    out = lanczos_tridiagonal(DenseOperator(m), m_steps, generator=gen(9))
    alpha, beta, q = out
    assert alpha.shape == (m_steps,) and beta.shape == (m_steps - 1,) and q.shape == (p, m_steps)
    assert alpha.dtype == F64 and alpha.device.type == "cpu"
    torch.testing.assert_close(q.T @ q, torch.eye(m_steps, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ m @ q, out.tridiagonal(), atol=1e-10, rtol=0)
    v0 = torch.randn(p, generator=gen(1), dtype=F64)
    out2 = lanczos_tridiagonal(DenseOperator(m), 3, v0)
    torch.testing.assert_close(out2.Q[:, 0], v0 / v0.norm())


def test_lanczos_tridiagonal_breakdown() -> None:
    d = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=F64)
    op = DenseOperator(torch.diag(d))
    v0 = torch.ones(6, dtype=F64)
    out = lanczos_tridiagonal(op, 6, v0)  # Krylov space of dimension 3: stops early
    assert out.alpha.shape == (3,) and out.beta.shape == (2,)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(out.tridiagonal()), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    )
    out_r = lanczos_tridiagonal(op, 6, v0, generator=gen(0), restart_on_breakdown=True)
    assert out_r.alpha.shape == (6,) and out_r.beta[2] == 0.0
    torch.testing.assert_close(torch.linalg.eigvalsh(out_r.tridiagonal()), d)


# ------------------------------------------------------------------ Hutchinson


def test_hutchinson_trace_seeded_tolerance() -> None:
    m = sym_matrix(40, seed=10, spd=False)
    op = DenseOperator(m)
    n = 400
    est = hutchinson_trace(op, num_samples=n, generator=gen(11))
    # Rademacher variance of one sample: 2 * sum_{i != j} A_ij^2.
    se_theory = math.sqrt(2 * ((m**2).sum() - (torch.diagonal(m) ** 2).sum()).item() / n)
    assert est.samples.shape == (n,)
    assert 0.8 * se_theory < est.standard_error.item() < 1.2 * se_theory
    assert abs(est.estimate.item() - torch.trace(m).item()) < 4 * se_theory
    gauss = hutchinson_trace(op, num_samples=n, distribution="gaussian", generator=gen(12))
    se_gauss = math.sqrt(2 * (m**2).sum().item() / n)
    assert abs(gauss.estimate.item() - torch.trace(m).item()) < 4 * se_gauss


def test_hutchinson_exact_for_diagonal_with_rademacher() -> None:
    d = torch.randn(15, generator=gen(1), dtype=F64)
    op = DenseOperator(torch.diag(d))
    est = hutchinson_trace(op, num_samples=3, generator=gen(2))
    torch.testing.assert_close(est.estimate, d.sum(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(est.standard_error, torch.zeros((), dtype=F64), atol=1e-13, rtol=0)
    diag = hutchinson_diagonal(op, num_samples=3, generator=gen(3))
    torch.testing.assert_close(diag.estimate, d, rtol=1e-13, atol=1e-13)
    single = hutchinson_trace(op, num_samples=1, generator=gen(2))
    assert math.isnan(single.standard_error.item())
    assert torch.isnan(hutchinson_diagonal(op, 1).standard_error).all()


def test_hutchinson_batch_size_invariance() -> None:
    op = DenseOperator(sym_matrix(12, seed=4))
    a = hutchinson_trace(op, num_samples=10, batch_size=1, generator=gen(5))
    b = hutchinson_trace(op, num_samples=10, batch_size=4, generator=gen(5))
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-13, atol=1e-13)
    da = hutchinson_diagonal(op, num_samples=10, batch_size=1, generator=gen(6))
    db = hutchinson_diagonal(op, num_samples=10, batch_size=3, generator=gen(6))
    dc = hutchinson_diagonal(op, num_samples=10, batch_size=10, generator=gen(6))
    for other in (db, dc):
        torch.testing.assert_close(da.estimate, other.estimate, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(da.standard_error, other.standard_error, rtol=1e-10, atol=1e-12)


def test_hutchinson_diagonal_seeded_tolerance() -> None:
    m = sym_matrix(20, seed=13)
    est = hutchinson_diagonal(DenseOperator(m), num_samples=300, generator=gen(14))
    err = (est.estimate - torch.diagonal(m)).abs()
    assert torch.all(err <= 5 * est.standard_error)
    # Per-entry Rademacher variance: sum_{j != i} A_ij^2.
    se_theory = torch.sqrt(((m**2).sum(1) - torch.diagonal(m) ** 2) / 300)
    assert torch.all((est.standard_error / se_theory - 1).abs() < 0.3)


def test_hutchinson_argument_errors() -> None:
    op = IdentityOperator(3, F64)
    for func in (hutchinson_trace, hutchinson_diagonal):
        with pytest.raises(ValueError, match="num_samples must be >= 1"):
            func(op, 0)
        with pytest.raises(ValueError, match="distribution must be one of"):
            func(op, 2, distribution="normal")
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            func(op, 2, batch_size=0)
        with pytest.raises(TypeError, match="generator"):
            func(op, 2, generator="seed")  # type: ignore[arg-type]


# ------------------------------------------------------------------ CG


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_cg_matches_solve(damping: float) -> None:
    p = 30
    m = sym_matrix(p, seed=15)
    b = torch.randn(p, generator=gen(16), dtype=F64)
    res = cg(DenseOperator(m), b, damping=damping, tol=1e-10)
    ref = torch.linalg.solve(m + damping * torch.eye(p, dtype=F64), b)
    assert res.converged and res.reason == "converged"
    assert res.residual_norm <= 1e-10 * b.norm()
    true_res = (b - (m + damping * torch.eye(p, dtype=F64)) @ res.x).norm()
    assert true_res <= 1e-9 * b.norm()
    torch.testing.assert_close(res.x, ref, rtol=1e-8, atol=1e-10)
    assert res.num_iter <= 2 * p  # rounding costs a few extra steps beyond P
    assert len(res.residual_norms) == len(res.quadratic_values) == res.num_iter + 1
    q = res.quadratic_values
    assert all(q[i + 1] <= q[i] + 1e-12 for i in range(len(q) - 1))
    phi = 0.5 * res.x @ (m @ res.x + damping * res.x) - b @ res.x
    assert abs(q[-1] - phi.item()) <= 1e-10 * abs(phi.item())
    assert q[0] == 0.0


def test_cg_max_iter_and_nonconvergence() -> None:
    m = sym_matrix(30, seed=17)
    b = torch.randn(30, generator=gen(18), dtype=F64)
    res = cg(DenseOperator(m), b, max_iter=3)
    assert res.num_iter == 3 and not res.converged and res.reason == "max_iter"
    assert res.residual_norm > 1e-6 * b.norm()
    res0 = cg(DenseOperator(m), b, max_iter=0)
    assert res0.num_iter == 0 and not res0.converged
    torch.testing.assert_close(res0.x, torch.zeros_like(b))


def test_cg_parameter_forms_x0_and_callback() -> None:
    p = 10
    m = sym_matrix(p, seed=19)
    shapes, names = [(2, 3), (4,)], ["w", "b"]
    op = DenseOperator(m, param_shapes=shapes, param_names=names)
    b_flat = torch.randn(p, generator=gen(20), dtype=F64)
    ref = torch.linalg.solve(m + 0.1 * torch.eye(p, dtype=F64), b_flat)
    res_list = cg(op, op.unflatten(b_flat), damping=0.1, tol=1e-12)
    assert isinstance(res_list.x, list) and [t.shape for t in res_list.x] == [(2, 3), (4,)]
    torch.testing.assert_close(op.flatten(res_list.x), ref)
    res_dict = cg(op, op.unflatten(b_flat, as_dict=True), damping=0.1, tol=1e-12)
    assert isinstance(res_dict.x, dict) and list(res_dict.x) == names
    torch.testing.assert_close(op.flatten(res_dict.x), ref)

    warm = cg(op, b_flat, damping=0.1, x0=op.unflatten(ref, as_dict=True), tol=1e-8)
    assert warm.converged and warm.num_iter == 0

    seen: list[tuple[int, float]] = []

    def callback(i: int, x: torch.Tensor, rnorm: float) -> bool:
        seen.append((i, rnorm))
        assert x.shape == (p,)
        return i == 2

    stopped = cg(op, b_flat, callback=callback)
    assert stopped.reason == "callback" and stopped.num_iter == 2 and not stopped.converged
    assert [i for i, _ in seen] == [1, 2]
    assert seen[-1][1] == stopped.residual_norm

    zero = cg(op, torch.zeros(p, dtype=F64))
    assert zero.converged and zero.num_iter == 0 and torch.all(zero.x == 0)


def test_cg_negative_curvature() -> None:
    op = DenseOperator(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)))
    res = cg(op, torch.tensor([0.0, 1.0], dtype=F64))
    assert res.reason == "negative_curvature" and not res.converged and res.num_iter == 0
    res_damped = cg(op, torch.tensor([0.0, 1.0], dtype=F64), damping=2.0)
    assert res_damped.converged
    torch.testing.assert_close(res_damped.x, torch.tensor([0.0, 1.0], dtype=F64))


def test_cg_argument_errors() -> None:
    op = DenseOperator(sym_matrix(4), param_shapes=[(2,), (2,)], param_names=["a", "b"])
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"b must have shape \(4,\) \(P = 4\), got \(5,\)"):
        cg(op, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"b must have shape \(4,\)"):
        cg(op, torch.ones(4, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"b has dtype torch\.float32"):
        cg(op, torch.ones(4))
    with pytest.raises(ValueError, match=r"b: expected a list of 2"):
        cg(op, [torch.ones(2, dtype=F64)])
    with pytest.raises(ValueError, match=r"b: v dict keys.*missing: \['b'\]"):
        cg(op, {"a": torch.ones(2, dtype=F64)})
    with pytest.raises(ValueError, match="b must be a single vector"):
        cg(op, [torch.ones(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64)])
    with pytest.raises(TypeError, match=r"b must be a torch\.Tensor"):
        cg(op, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a curvlab LinearOperator"):
        cg(sym_matrix(4), [torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)])
    with pytest.raises(ValueError, match=r"x0 must have shape \(4,\)"):
        cg(op, b, x0=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        cg(op, b, damping=-1.0)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        cg(op, b, tol=-1e-3)
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        cg(op, b, max_iter=-1)
    with pytest.raises(TypeError, match="callback must be callable"):
        cg(op, b, callback=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ SLQ


def test_slq_density_integrates_to_one_and_mean() -> None:
    p = 50
    m = sym_matrix(p, seed=21, spd=False)
    out = spectral_density(DenseOperator(m), num_probes=20, num_iter=20, generator=gen(22))
    assert out.grid.dtype == F64 and out.grid.shape == (1000,) and out.density.shape == (1000,)
    assert abs(torch.trapezoid(out.density, out.grid).item() - 1) < 1e-3
    torch.testing.assert_close(out.weights.sum(), torch.tensor(1.0, dtype=F64))
    assert torch.all(out.weights >= 0)
    ref = torch.linalg.eigvalsh(m)
    assert out.nodes.min() >= ref[0] - 1e-8 and out.nodes.max() <= ref[-1] + 1e-8
    mean_density = torch.trapezoid(out.grid * out.density, out.grid).item()
    mean_nodes = (out.weights * out.nodes).sum().item()
    assert abs(mean_density - mean_nodes) < 1e-3
    # Mean = average of 20 Rademacher Hutchinson samples / P; explicit seeded tolerance.
    se = math.sqrt(2 * ((m**2).sum() - (torch.diagonal(m) ** 2).sum()).item() / 20) / p
    assert abs(mean_nodes - torch.trace(m).item() / p) < 4 * se


def test_slq_exact_cases() -> None:
    d = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=F64)
    out = spectral_density(DenseOperator(torch.diag(d)), num_probes=3, num_iter=6, generator=gen(0))
    assert out.nodes.shape == (9,)  # breakdown after 3 steps per probe
    torch.testing.assert_close((out.weights * out.nodes).sum(), d.mean(), rtol=1e-13, atol=0)
    m = sym_matrix(12, seed=23)
    full = spectral_density(DenseOperator(m), num_probes=1, num_iter=12, generator=gen(1))
    torch.testing.assert_close(
        torch.sort(full.nodes).values, torch.linalg.eigvalsh(m), rtol=1e-8, atol=1e-10
    )


def test_slq_explicit_grid_and_sigma() -> None:
    op = DenseOperator(sym_matrix(10, seed=24))
    grid = torch.linspace(-5.0, 20.0, 2001, dtype=torch.float32)
    out = spectral_density(op, num_probes=2, num_iter=10, grid=grid, sigma=0.3, generator=gen(2))
    assert out.sigma == 0.3 and out.grid.dtype == F64
    torch.testing.assert_close(out.grid, grid.double())
    assert abs(torch.trapezoid(out.density, out.grid).item() - 1) < 1e-6
    same = spectral_density(IdentityOperator(4, F64), num_probes=1, num_iter=4, generator=gen(3))
    assert same.sigma == pytest.approx(0.02)
    torch.testing.assert_close(same.nodes, torch.ones(1, dtype=F64))


def test_slq_argument_errors() -> None:
    op = IdentityOperator(4, F64)
    with pytest.raises(ValueError, match="grid must be >= 2"):
        spectral_density(op, grid=1)
    with pytest.raises(ValueError, match="grid tensor must be 1-D"):
        spectral_density(op, grid=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="grid tensor must be floating"):
        spectral_density(op, grid=torch.arange(3))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        spectral_density(op, sigma=0.0)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        spectral_density(op, num_probes=0)
    with pytest.raises(ValueError, match="num_iter must be >= 1"):
        spectral_density(op, num_iter=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        spectral_density(op, distribution="uniform")
