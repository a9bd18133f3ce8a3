"""Tests for curvlab.operators.base: input forms, validation, algebra, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.operators.base import (
    AdjointOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
    flatten_params,
    unflatten,
)

F64 = torch.float64
SHAPES = [torch.Size([2, 3]), torch.Size([3]), torch.Size([])]  # P = 6 + 3 + 1 = 10
NAMES = ["w", "b", "s"]
P = 10


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def layout_op(seed: int = 0, symmetric: bool = False) -> DenseOperator:
    m = rand(P, P, seed=seed)
    if symmetric:
        m = m + m.T
    return DenseOperator(m, param_shapes=SHAPES, param_names=NAMES)


class ListDiag(LinearOperator):
    """Elementwise scaling implemented through the parameter-form hook."""

    def __init__(self, scales: list[torch.Tensor], names: list[str] | None = None) -> None:
        p = sum(s.numel() for s in scales)
        super().__init__(
            (p, p),
            scales[0].dtype,
            scales[0].device,
            param_shapes=[s.shape for s in scales],
            param_names=names,
            symmetric=True,
        )
        self.scales = scales
        self.calls = 0

    def _matvec_list(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        return [s * v for s, v in zip(self.scales, vs)]


def list_diag() -> ListDiag:
    scales = [rand(*s, seed=i + 10) if len(s) else rand(1, seed=3)[0] for i, s in enumerate(SHAPES)]
    return ListDiag(scales, NAMES)


# ------------------------------------------------------------------ helpers


def test_flatten_unflatten_roundtrip() -> None:
    vs = [rand(2, 3), rand(3, seed=1), rand(1, seed=2).reshape(())]
    flat = flatten_params(vs)
    assert flat.shape == (10,)
    torch.testing.assert_close(flat[:6], vs[0].reshape(-1))  # row-major
    for a, b in zip(unflatten(flat, SHAPES), vs):
        torch.testing.assert_close(a, b)
    batched = [rand(2, 3, 4), rand(3, 4, seed=1), rand(4, seed=2)]
    mat = flatten_params(batched, batched=True)
    assert mat.shape == (10, 4)
    torch.testing.assert_close(mat[:, 1], flatten_params([t[..., 1] for t in batched]))
    for a, b in zip(unflatten(mat, SHAPES), batched):
        torch.testing.assert_close(a, b)


def test_flatten_unflatten_errors() -> None:
    with pytest.raises(TypeError, match="list or tuple"):
        flatten_params(rand(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        flatten_params([])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        flatten_params([rand(2), 3.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dtype"):
        flatten_params([rand(2), rand(2).float()])
    with pytest.raises(ValueError, match="trailing dimension 3"):
        flatten_params([rand(2, 2), rand(2, 3)], batched=True)
    with pytest.raises(ValueError, match="0-d"):
        flatten_params([rand(2, 2), rand(1)[0]], batched=True)
    with pytest.raises(ValueError, match="hold 10 entries"):
        unflatten(rand(9), SHAPES)
    with pytest.raises(ValueError, match=r"\(P,\) or \(P, K\)"):
        unflatten(rand(10, 1, 1), SHAPES)
    with pytest.raises(TypeError, match="flat must be"):
        unflatten([1.0], SHAPES)  # type: ignore[arg-type]


# ------------------------------------------------------------------ construction / contract


def test_constructor_validation() -> None:
    m = rand(P, P)
    with pytest.raises(ValueError, match="square"):
        DenseOperator(rand(3, 4))
    with pytest.raises(TypeError, match="real floating"):
        DenseOperator(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"matrix must be a torch\.Tensor"):
        DenseOperator(np.eye(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hold 9 entries.*6 \(2, 3\) \+ 3 \(3,\)"):
        DenseOperator(m, param_shapes=[(2, 3), (3,)])
    with pytest.raises(ValueError, match="duplicates"):
        DenseOperator(m, param_shapes=SHAPES, param_names=["a", "a", "b"])
    with pytest.raises(ValueError, match="param_names has 2 entries"):
        DenseOperator(m, param_shapes=SHAPES, param_names=["a", "b"])
    with pytest.raises(TypeError, match=r"param_shapes\[1\]"):
        DenseOperator(m, param_shapes=[(6,), "abcd"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="symmetric=True but matrix is not symmetric"):
        DenseOperator(m, symmetric=True)
    with pytest.raises(TypeError, match="symmetric must be"):
        DenseOperator(m + m.T, symmetric=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="size must be an int"):
        IdentityOperator(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="P >= 1"):
        IdentityOperator(0)


def test_subclass_must_implement_a_hook() -> None:
    class Nothing(LinearOperator):
        pass

    with pytest.raises(TypeError, match="must implement _matmat"):
        Nothing((2, 2), F64, "cpu")


def test_subclass_forgetting_super_init() -> None:
    class Forgetful(LinearOperator):
        def __init__(self) -> None:
            pass

        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return M

    with pytest.raises(AttributeError, match=r"call LinearOperator\.__init__"):
        Forgetful() @ rand(2)


def test_bad_hook_output_raises_runtime_error() -> None:
    class BadShape(LinearOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return M[:-1]

    class BadDtype(LinearOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return M.float()

    class BadList(LinearOperator):
        def _matvec_list(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [v[:1] for v in vs]

    with pytest.raises(RuntimeError, match=r"BadShape._matmat returned shape \(2, 1\)"):
        BadShape((3, 3), F64, "cpu") @ rand(3)
    with pytest.raises(RuntimeError, match=r"dtype torch\.float32"):
        BadDtype((3, 3), F64, "cpu") @ rand(3)
    with pytest.raises(RuntimeError, match=r"BadList._matvec_list returned \(1,\) for block 0"):
        BadList((3, 3), F64, "cpu") @ rand(3)


def test_matvec_list_subclass_derives_matmat() -> None:
    op = list_diag()
    dense = torch.diag(torch.cat([s.reshape(-1) for s in op.scales]))
    m = rand(P, 3)
    torch.testing.assert_close(op @ m, dense @ m)
    assert op.calls == 3  # one call per column
    torch.testing.assert_close(op.to_dense(), dense)
    vs = op.unflatten(rand(P))
    torch.testing.assert_close(op._matvec_list(vs)[0], op.scales[0] * vs[0])


# ------------------------------------------------------------------ input forms


@pytest.mark.parametrize("make", [layout_op, list_diag])
def test_all_input_forms_agree(make) -> None:
    op = make()
    dense = op.to_dense()
    v = rand(P, seed=5)
    m = rand(P, 4, seed=6)
    torch.testing.assert_close(op @ v, dense @ v)
    torch.testing.assert_close(op @ m, dense @ m)

    vs = unflatten(v, SHAPES)
    out_list = op @ vs
    assert isinstance(out_list, list)
    assert [t.shape for t in out_list] == SHAPES
    torch.testing.assert_close(flatten_params(out_list), dense @ v)
    out_tuple = op @ tuple(vs)
    assert isinstance(out_tuple, list)

    out_dict = op @ dict(zip(reversed(NAMES), reversed(vs)))  # key order does not matter
    assert list(out_dict) == NAMES
    torch.testing.assert_close(flatten_params(list(out_dict.values())), dense @ v)

    ms = unflatten(m, SHAPES)  # trailing batch dimension K = 4
    out_b = op @ ms
    assert [t.shape for t in out_b] == [torch.Size((*s, 4)) for s in SHAPES]
    torch.testing.assert_close(flatten_params(out_b, batched=True), dense @ m)
    out_bd = op @ dict(zip(NAMES, ms))
    torch.testing.assert_close(out_bd["w"], out_b[0])

    assert (op @ rand(P, 0)).shape == (P, 0)


def test_flatten_and_unflatten_methods() -> None:
    op = layout_op()
    v = rand(P)
    d = op.unflatten(v, as_dict=True)
    assert list(d) == NAMES and d["w"].shape == (2, 3) and d["s"].shape == ()
    torch.testing.assert_close(op.flatten(d), v)
    torch.testing.assert_close(op.flatten(list(d.values())), v)
    assert op.flatten(v) is v
    with pytest.raises(TypeError, match="v must be"):
        op.flatten(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flat has 9 rows"):
        op.unflatten(rand(9))


def test_wrong_length_message_has_breakdown() -> None:
    op = layout_op()
    with pytest.raises(ValueError) as info:
        op @ rand(9)
    msg = str(info.value)
    assert "9 rows" in msg and "P = 10" in msg
    assert "w: (2, 3) -> 6" in msg and "b: (3,) -> 3" in msg and "s: () -> 1" in msg
    with pytest.raises(ValueError, match="P = 10"):
        op @ rand(11, 2)
    with pytest.raises(ValueError, match="3-d tensor"):
        op @ rand(P, 1, 1)


def test_list_and_dict_errors() -> None:
    op = layout_op()
    vs = unflatten(rand(P), SHAPES)
    with pytest.raises(ValueError, match=r"list of 3 parameter-shaped tensors \(w, b, s\), got 2"):
        op @ vs[:2]
    with pytest.raises(ValueError, match=r"v\[1\] \('b'\) has shape \(4,\), expected \(3,\)"):
        op @ [vs[0], rand(4), vs[2]]
    with pytest.raises(ValueError, match=r"v\[0\] \('w'\) has shape \(3, 2\), expected \(2, 3\)"):
        op @ [vs[0].T, vs[1], vs[2]]
    with pytest.raises(TypeError, match=r"v\[2\] \('s'\) must be a torch.Tensor"):
        op @ [vs[0], vs[1], 1.0]
    ms = unflatten(rand(P, 2), SHAPES)
    with pytest.raises(ValueError, match=r"v\[1\] \('b'\) has shape \(3,\), expected \(3, 2\)"):
        op @ [ms[0], vs[1], ms[2]]  # batched first, unbatched second
    with pytest.raises(ValueError, match=r"v\[1\] \('b'\) has shape \(3, 5\), expected \(3, 2\)"):
        op @ [ms[0], rand(3, 5), ms[2]]
    with pytest.raises(ValueError, match=r"missing: \['s'\], unknown: \['x'\]"):
        op @ {"w": vs[0], "b": vs[1], "x": vs[2]}
    with pytest.raises(ValueError, match=r"v\['b'\] has shape"):
        op @ {"w": vs[0], "b": rand(2), "s": vs[2]}


def test_dtype_device_and_type_errors() -> None:
    op = layout_op()
    with pytest.raises(ValueError, match=r"dtype torch\.float32, expected torch\.float64"):
        op @ rand(P).float()
    with pytest.raises(ValueError, match="device meta, expected cpu"):
        op @ torch.zeros(P, dtype=F64, device="meta")
    vs = unflatten(rand(P), SHAPES)
    with pytest.raises(ValueError, match=r"v\[1\] \('b'\) has dtype torch.float32"):
        op @ [vs[0], vs[1].float(), vs[2]]
    with pytest.raises(TypeError, match=r"torch\.from_numpy"):
        op @ np.ones(P)
    with pytest.raises(TypeError, match="is not supported"):
        op @ 3
    with pytest.raises(TypeError, match="is not supported"):
        op @ "abc"
    with pytest.raises(TypeError, match=r"left operand must be a torch\.Tensor"):
        np.ones(P) @ op


def test_rmatmul() -> None:
    op = layout_op()
    dense = op.to_dense()
    v = rand(P, seed=3)
    torch.testing.assert_close(v @ op, v @ dense)
    m = rand(4, P, seed=4)
    torch.testing.assert_close(m @ op, m @ dense)
    with pytest.raises(ValueError, match=r"expected \(K, 10\)"):
        rand(P, 4) @ op


# ------------------------------------------------------------------ algebra


def test_algebra_matches_dense() -> None:
    a, b = DenseOperator(rand(P, P, seed=1)), DenseOperator(rand(P, P, seed=2))
    ma, mb = a.matrix, b.matrix
    m = rand(P, 3, seed=3)
    eye = torch.eye(P, dtype=F64)
    cases = {
        "a+b": (a + b, ma + mb),
        "a-b": (a - b, ma - mb),
        "2a": (2 * a, 2 * ma),
        "a*2": (a * 2.0, 2 * ma),
        "a/4": (a / 4, ma / 4),
        "-a": (-a, -ma),
        "ab": (a @ b, ma @ mb),
        "aba": (a @ b @ a, ma @ mb @ ma),
        "(a+b)T": ((a + b).T, (ma + mb).T),
        "(ab)T": ((a @ b).T, (ma @ mb).T),
        "(3a)T": ((3 * a).T, 3 * ma.T),
        "a+I": (a + IdentityOperator(P, F64), ma + eye),
        "np-scalar": (np.float64(0.5) * a, 0.5 * ma),
        "a@(b-0.5a).T": (a @ (b - 0.5 * a).T, ma @ (mb - 0.5 * ma).T),
    }
    for name, (op, dense) in cases.items():
        assert isinstance(op, LinearOperator), name
        torch.testing.assert_close(op @ m, dense @ m, msg=name)
        torch.testing.assert_close(op.to_dense(), dense, msg=name)
        torch.testing.assert_close(op.diag(), torch.diagonal(dense), msg=name)


def test_composites_flatten_and_merge_scalars() -> None:
    a, b, c = (DenseOperator(rand(3, 3, seed=s)) for s in range(3))
    s = a + b + c
    assert isinstance(s, SumOperator) and len(s.operators) == 3
    p = a @ b @ c
    assert isinstance(p, ProductOperator) and len(p.operators) == 3
    sc = 2 * (3 * a)
    assert isinstance(sc, ScaledOperator) and sc.alpha == 6.0 and sc.operator is a


def test_symmetry_flags_and_adjoint() -> None:
    sym = layout_op(symmetric=True)
    nonsym = layout_op()
    assert sym.symmetric is True and nonsym.symmetric is False
    assert (sym + sym).symmetric is True
    assert (sym + nonsym).symmetric is False
    assert (nonsym + nonsym).symmetric is None
    assert (sym @ sym).symmetric is None
    assert (2 * sym).symmetric is True
    assert DenseOperator(rand(3, 3), symmetric=False).symmetric is False
    assert IdentityOperator(3).T.symmetric is True
    s = sym + sym
    assert s.T is s
    torch.testing.assert_close(nonsym.T.to_dense(), nonsym.to_dense().T)
    assert nonsym.T.param_names == NAMES


def test_adjoint_hooks() -> None:
    class Shift(LinearOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return torch.roll(M, 1, dims=0)

        def _rmatmat(self, M: torch.Tensor) -> torch.Tensor:
            return torch.roll(M, -1, dims=0)

    class NoAdjoint(LinearOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return torch.roll(M, 1, dims=0)

    op = Shift((4, 4), F64, "cpu")
    adj = op.T
    assert isinstance(adj, AdjointOperator) and adj.T is op
    torch.testing.assert_close(adj.to_dense(), op.to_dense().T)
    torch.testing.assert_close((op @ op.T).to_dense(), torch.eye(4, dtype=F64))
    torch.testing.assert_close(((2 * op) + op).T.to_dense(), 3 * op.to_dense().T)
    bad = NoAdjoint((4, 4), F64, "cpu")
    with pytest.raises(NotImplementedError, match="not flagged symmetric=True"):
        bad.T
    with pytest.raises(NotImplementedError):
        (bad + bad).T
    with pytest.raises(TypeError, match="does not implement _rmatmat"):
        AdjointOperator(bad)


def test_algebra_errors() -> None:
    a = DenseOperator(rand(P, P))
    with pytest.raises(ValueError, match=r"operand 1 has shape \(3, 3\)"):
        a + DenseOperator(rand(3, 3))
    with pytest.raises(ValueError, match=r"operand 1 has dtype torch\.float32"):
        a @ DenseOperator(rand(P, P).float())
    with pytest.raises(ValueError, match="different parameter layouts"):
        layout_op() + DenseOperator(rand(P, P), param_shapes=[(5,), (5,)])
    with pytest.raises(TypeError, match="wrap explicit matrices in DenseOperator"):
        a + rand(P, P)
    with pytest.raises(TypeError, match="unsupported operand for \\+: int"):
        1 + a
    with pytest.raises(TypeError, match="unsupported operand for -: float"):
        1.0 - a
    with pytest.raises(TypeError, match="use A @ B"):
        a * a
    with pytest.raises(TypeError, match=r"float\(t\)"):
        a * torch.tensor(2.0)
    with pytest.raises(TypeError, match="real number"):
        a * True
    with pytest.raises(TypeError, match="real number"):
        a * 1j
    with pytest.raises(ValueError, match="finite"):
        a * math.nan
    with pytest.raises(ValueError, match="non-zero"):
        a / 0
    with pytest.raises(ValueError, match="at least one"):
        SumOperator([])
    with pytest.raises(TypeError, match="operand 1 is Tensor"):
        ProductOperator([a, rand(P, P)])  # type: ignore[list-item]


def test_identity_like() -> None:
    op = layout_op()
    eye = IdentityOperator.like(op)
    assert eye.param_names == NAMES and eye.dtype == F64 and eye.symmetric is True
    torch.testing.assert_close((op + 2 * eye).to_dense(), op.matrix + 2 * torch.eye(P, dtype=F64))
    with pytest.raises(TypeError, match="op must be a LinearOperator"):
        IdentityOperator.like(op.matrix)  # type: ignore[arg-type]


def test_layout_is_kept_by_composites() -> None:
    op = layout_op(symmetric=True)
    for comp in (op + IdentityOperator(P, F64), IdentityOperator(P, F64) - op, 2 * op, op @ op):
        assert comp.param_names == NAMES and comp.param_shapes == SHAPES
        out = comp @ {n: t for n, t in zip(NAMES, unflatten(rand(P), SHAPES))}
        assert list(out) == NAMES


# ------------------------------------------------------------------ export


def test_to_dense_chunks_and_diag() -> None:
    op = layout_op() @ layout_op(seed=1) + IdentityOperator(P, F64)
    ref = layout_op().matrix @ layout_op(seed=1).matrix + torch.eye(P, dtype=F64)
    for cs in (None, 1, 3, 100):
        torch.testing.assert_close(op.to_dense(chunk_size=cs), ref)
        torch.testing.assert_close(op.diag(chunk_size=cs), torch.diagonal(ref))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            op.to_dense(chunk_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        IdentityOperator(3).diag(chunk_size=0)


def test_to_scipy_roundtrip() -> None:
    from scipy.sparse.linalg import eigsh

    nonsym = layout_op()
    sp = nonsym.to_scipy()
    dense = nonsym.matrix.numpy()
    x = np.random.default_rng(0).standard_normal((P, 3))
    assert sp.shape == (P, P) and sp.dtype == np.float64
    np.testing.assert_allclose(sp @ x[:, 0], dense @ x[:, 0], rtol=1e-12)
    np.testing.assert_allclose(sp.matmat(x), dense @ x, rtol=1e-12)
    np.testing.assert_allclose(sp.rmatvec(x[:, 0]), dense.T @ x[:, 0], rtol=1e-12)
    with pytest.raises(TypeError, match="complex"):
        sp.matvec(x[:, 0] + 1j)

    sym32 = DenseOperator(layout_op(symmetric=True).matrix.float())
    vals = eigsh(sym32.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(sym32.matrix.double()).numpy()[-2:]
    np.testing.assert_allclose(np.sort(vals), ref, rtol=1e-5)

    class NoAdjoint(LinearOperator):
        def _matmat(self, M: torch.Tensor) -> torch.Tensor:
            return 2 * M

    sp2 = NoAdjoint((3, 3), F64, "cpu").to_scipy()
    np.testing.assert_allclose(sp2 @ np.ones(3), 2 * np.ones(3))
    with pytest.raises(NotImplementedError):
        sp2.rmatvec(np.ones(3))


def test_repr() -> None:
    r = repr(layout_op())
    assert r.startswith("DenseOperator(shape=(10, 10), dtype=torch.float64, device=cpu")
    assert "params=3" in r
    r2 = repr(2 * IdentityOperator(2) + IdentityOperator(2))
    assert r2.startswith("SumOperator(shape=(2, 2)") and "alpha=2.0" in r2


# ------------------------------------------------------------------ property-based


@st.composite
def problems(draw):
    p = draw(st.integers(1, 12))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    alpha = draw(st.floats(-3, 3, allow_nan=False))
    beta = draw(st.floats(-3, 3, allow_nan=False))
    return p, k, seed, alpha, beta


@settings(max_examples=40, deadline=None)
@given(problems())
def test_linearity(problem) -> None:
    p, k, seed, alpha, beta = problem
    g = torch.Generator().manual_seed(seed)
    a = DenseOperator(torch.randn(p, p, generator=g, dtype=F64))
    lst = ListDiag([torch.randn(p, generator=g, dtype=F64)])
    u = torch.randn(p, k, generator=g, dtype=F64)
    v = torch.randn(p, k, generator=g, dtype=F64)
    for op in (a, lst, a @ lst - 0.5 * a.T):
        lhs = op @ (alpha * u + beta * v)
        rhs = alpha * (op @ u) + beta * (op @ v)
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((op @ u)[:, 0], op @ u[:, 0])


@settings(max_examples=40, deadline=None)
@given(problems())
def test_sum_and_product_against_dense(problem) -> None:
    p, k, seed, alpha, beta = problem
    g = torch.Generator().manual_seed(seed)
    ma, mb = torch.randn(p, p, generator=g, dtype=F64), torch.randn(p, p, generator=g, dtype=F64)
    a, b = DenseOperator(ma), DenseOperator(mb)
    v = torch.randn(p, k, generator=g, dtype=F64)
    torch.testing.assert_close((a + b) @ v, a @ v + b @ v)
    torch.testing.assert_close((alpha * a - beta * b) @ v, (alpha * ma - beta * mb) @ v)
    torch.testing.assert_close((a @ b).T @ v, mb.T @ (ma.T @ v))
