r"""Anatomy of K-FAC on the 3-4-2 network of the MindSpore THOR article.

Network: ``Linear(3, 4, bias=False) → tanh → Linear(4, 2, bias=False)``, softmax cross-entropy
(``reduction='mean'``), 20 parameters (``W1``: 12, ``W2``: 8). For this model the true Fisher
equals the GGN (checked here by enumerating both classes), so the exact 20×20 Fisher is
``curvlab.GGN(...).to_dense()``.

Order convention. curvlab vectorizes each weight row-major, so the K-FAC block of layer ``i`` is
``G_i ⊗ A_i`` (12×12 = 4×4 ⊗ 3×3 for ``W1``; 8×8 = 2×2 ⊗ 4×4 for ``W2``). The papers (and the
THOR article) vectorize column-major and write the same blocks as ``A_i ⊗ G_i`` (3×3 ⊗ 4×4 and
4×4 ⊗ 2×2); the two differ by the commutation (perfect-shuffle) permutation, which is checked.

What is computed (:func:`compute_anatomy`): the exact Fisher (or empirical Fisher), its
diagonal blocks, the K-FAC factors, the block-diagonal, K-FAC block-diagonal, K-FAC
block-tridiagonal and EKFAC approximations with their relative Frobenius errors, and
(:func:`inversion_costs`) the cost of inverting dense, block-diagonal and Kronecker-factored
forms of a ``w-w-w`` network as the width ``w`` grows (FLOP counts and interleaved median
timings of Cholesky factorizations).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.threads import single_thread
from curvlab.func.per_example import per_example_grads
from curvlab.kfac import find_layers
from curvlab.operators import GGN, EmpiricalFisher
from curvlab.operators.kfac import KFAC

__all__ = [
    "EXPERIMENT",
    "Anatomy",
    "commutation_matrix",
    "compute_anatomy",
    "exact_fisher_by_enumeration",
    "inversion_costs",
    "kfac_anatomy",
    "make_data",
    "make_thor_net",
    "plot_blocks",
    "plot_fisher",
]

EXPERIMENT = "kfac-anatomy"
SIZES = (3, 4, 2)
DT = torch.float64


def make_thor_net(seed: int = 0, *, activation: bool = True) -> nn.Sequential:
    """The bias-free 3-4-2 network (tanh between the layers unless ``activation=False``).

    Example:
        >>> sum(p.numel() for p in make_thor_net().parameters())
        20
    """
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4, bias=False),
                        nn.Tanh() if activation else nn.Identity(),
                        nn.Linear(4, 2, bias=False)).to(DT)
    with torch.no_grad():
        for mod in (net[0], net[2]):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DT))
    return net


def make_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian inputs ``(n, 3)``; labels from a fixed random linear teacher with 10 % flips.

    Example:
        >>> x, y = make_data(5)
        >>> tuple(x.shape), tuple(y.shape)
        ((5, 3), (5,))
    """
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    teacher = torch.randn(3, 2, generator=g, dtype=DT)
    y = (x @ teacher).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1
    return x, torch.where(flip, 1 - y, y)


def exact_fisher_by_enumeration(net: nn.Module, x: Tensor) -> Tensor:
    r"""True Fisher :math:`\frac1N\sum_n\sum_y p(y|x_n)\nabla\log p\,\nabla\log p^\top` (2 classes).

    Example:
        >>> net = make_thor_net()
        >>> exact_fisher_by_enumeration(net, make_data(3)[0]).shape
        torch.Size([20, 20])
    """
    params = dict(net.named_parameters())
    p_total = sum(p.numel() for p in params.values())
    dtype = next(iter(params.values())).dtype

    def logp(out: Tensor, y: Tensor) -> Tensor:  # one example: log p(y_n | x_n)
        return out.log_softmax(1).gather(1, y.unsqueeze(1)).sum()

    with torch.no_grad():
        probs = net(x).softmax(1)
    fisher = torch.zeros(p_total, p_total, dtype=dtype)
    for y in range(probs.shape[1]):
        grads = per_example_grads(net, logp, params, x,
                                  torch.full((x.shape[0],), y, dtype=torch.long))
        g = torch.cat([grads[n].reshape(x.shape[0], -1) for n in params], dim=1)
        fisher += (g * probs[:, y:y + 1]).T @ g
    return fisher / x.shape[0]


def commutation_matrix(m: int, n: int) -> Tensor:
    """Permutation ``K`` with ``K vec_col(X) = vec_row(X)`` for ``X`` of shape ``(m, n)``.

    Then ``K (A ⊗ G) Kᵀ = G ⊗ A`` for ``A`` (n×n), ``G`` (m×m).

    Example:
        >>> X = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
        >>> torch.equal(commutation_matrix(2, 3) @ X.T.reshape(-1), X.reshape(-1))
        True
    """
    k = torch.zeros(m * n, m * n, dtype=DT)
    for i in range(m):
        for j in range(n):
            k[i * n + j, j * m + i] = 1.0
    return k


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Anatomy:
    """Matrices and errors of one anatomy run (all float64, curvlab row-major order)."""

    fisher_type: str
    n: int
    F: Tensor  # exact (true or empirical) Fisher, 20×20
    kfac: Tensor
    kfac_tri: Tensor
    ekfac: Tensor
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> (A, G)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def slices(self) -> list[slice]:
        return [slice(0, 12), slice(12, 20)]

    def block_diagonal(self) -> Tensor:
        """The exact diagonal blocks of ``F`` (zero elsewhere)."""
        return torch.block_diag(*[self.F[s, s] for s in self.slices])


@functools.lru_cache(maxsize=8)
def compute_anatomy(n: int = 256, seed: int = 0, fisher: str = "type2",
                    activation: bool = True) -> Anatomy:
    """Exact Fisher, K-FAC variants and relative Frobenius errors on the 3-4-2 network.

    ``fisher="type2"`` compares with the true Fisher (= GGN), ``"empirical"`` with the
    empirical Fisher (per-example gradients at the observed labels). Results are cached per
    argument tuple (the run is deterministic); do not modify the returned tensors.

    Example:
        >>> a = compute_anatomy(n=16)
        >>> a.F.shape, a.kfac.shape, round(a.errors["block-diagonal (exact blocks)"], 3) >= 0
        (torch.Size([20, 20]), torch.Size([20, 20]), True)
    """
    net = make_thor_net(seed, activation=activation)
    data = make_data(n, seed)
    loss = nn.CrossEntropyLoss()
    if fisher == "type2":
        F = GGN(net, loss, data).to_dense()
    elif fisher == "empirical":
        F = EmpiricalFisher(net, loss, data).to_dense()
    else:
        raise ValueError(f"fisher must be 'type2' or 'empirical', got {fisher!r}")
    K = KFAC(net, loss, data, fisher=fisher)
    tri = KFAC(net, loss, data, fisher=fisher, structure="block-tridiagonal")
    ek = KFAC(net, loss, data, fisher=fisher, ekfac=True)
    an = Anatomy(fisher, n, F, K.to_dense(), tri.to_dense(), ek.to_dense(),
                 {name: (f.A, f.G) for name, f in K.factors.items()})
    an.errors = {
        "block-diagonal (exact blocks)": _rel(an.block_diagonal(), F),
        "K-FAC block-diagonal": _rel(an.kfac, F),
        "K-FAC block-tridiagonal": _rel(an.kfac_tri, F),
        "EKFAC block-diagonal": _rel(an.ekfac, F),
    }
    for i, s in enumerate(an.slices):
        an.errors[f"K-FAC block {i + 1} vs F_{i + 1}{i + 1}"] = _rel(an.kfac[s, s], F[s, s])
        an.errors[f"EKFAC block {i + 1} vs F_{i + 1}{i + 1}"] = _rel(an.ekfac[s, s], F[s, s])
    an.errors["K-FAC tridiagonal off-block vs F_12"] = _rel(an.kfac_tri[:12, 12:], F[:12, 12:])
    return an


def _spd(n: int, gen: torch.Generator) -> Tensor:
    m = torch.randn(n, n, generator=gen, dtype=DT)
    return m @ m.T + n * torch.eye(n, dtype=DT)


def _time_cholesky(mat: Tensor, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        torch.linalg.cholesky(mat)
    return (time.perf_counter() - t0) / inner


def inversion_costs(widths: list[int], repeats: int = 5) -> pd.DataFrame:
    """Cost of inverting each form for a bias-free ``w-w-w`` network (2 layers of ``w×w``).

    FLOPs count ``n³/3`` per Cholesky of an ``n×n`` matrix: dense ``P = 2w²`` → ``P³/3``;
    block-diagonal → ``2 (w²)³/3``; Kronecker → ``4 w³/3`` (``A`` and ``G`` of both layers).
    Timings: one thread, per matrix size the median over ``repeats`` rounds (sizes interleaved
    within a round) of the mean time of a loop of Cholesky calls; a form's time is the sum over
    its blocks. They are noisy on a shared machine; the FLOPs are exact.

    Example:
        >>> row = inversion_costs([2], repeats=1).iloc[0]
        >>> int(row.params), round(row.flops_dense / row.flops_kronecker)  # 8w⁶/3 ÷ 4w³/3 = 2w³
        (8, 16)
    """
    gen = torch.Generator().manual_seed(0)
    with single_thread():
        rows = []
        for w in widths:
            p = 2 * w * w
            sizes = {"dense": [p], "block": [w * w] * 2, "kronecker": [w] * 4}
            mats = {n: _spd(n, gen) for n in {p, w * w, w}}
            inner = {n: max(1, min(200, int(2e7 / max(n, 2) ** 3))) for n in mats}
            samples: dict[int, list[float]] = {n: [] for n in mats}
            for _ in range(repeats):
                for n, m in mats.items():
                    samples[n].append(_time_cholesky(m, inner[n]))
            med = {n: float(np.median(v)) for n, v in samples.items()}
            flops = {k: sum(n**3 / 3 for n in v) for k, v in sizes.items()}
            secs = {k: sum(med[n] for n in v) for k, v in sizes.items()}
            rows.append({"width": w, "params": p,
                         **{f"flops_{k}": flops[k] for k in sizes},
                         **{f"time_{k}_s": secs[k] for k in sizes},
                         "flop_ratio_dense_over_kron": flops["dense"] / flops["kronecker"],
                         "time_ratio_dense_over_kron": secs["dense"] / secs["kronecker"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- figures


def _heat(ax, mat: Tensor, title: str, vmax: float | None = None) -> None:
    import seaborn as sns

    arr = mat.detach().cpu().numpy()
    v = float(np.abs(arr).max()) if vmax is None else vmax
    sns.heatmap(arr, ax=ax, cmap="RdBu_r", center=0.0, vmin=-v, vmax=v, square=True,
                cbar=True, xticklabels=False, yticklabels=False)
    ax.set_title(title, fontsize=9)


def plot_fisher(an: Anatomy) -> Figure:
    """Heatmaps: exact Fisher, K-FAC block-diagonal, K-FAC tridiagonal, EKFAC (same scale)."""
    fig = Figure(figsize=(14, 3.6), layout="constrained")
    axes = fig.subplots(1, 4)
    v = float(an.F.abs().max())
    name = "true Fisher (= GGN)" if an.fisher_type == "type2" else "empirical Fisher"
    for ax, (mat, title) in zip(axes, [(an.F, f"{name}, 20×20"),
                                       (an.kfac, "K-FAC block-diagonal"),
                                       (an.kfac_tri, "K-FAC block-tridiagonal"),
                                       (an.ekfac, "EKFAC block-diagonal")], strict=True):
        _heat(ax, mat, title, v)
        for b in (12,):
            ax.axhline(b, color="k", lw=0.8)
            ax.axvline(b, color="k", lw=0.8)
    return fig


def plot_blocks(an: Anatomy) -> Figure:
    """Each diagonal block next to its K-FAC Kronecker product ``G ⊗ A`` and the factors."""
    fig = Figure(figsize=(15, 6.4), layout="constrained")
    axes = fig.subplots(2, 5)
    for row, (s, (name, (A, G))) in enumerate(zip(an.slices, an.factors.items(), strict=True)):
        blk = an.F[s, s]
        kron = torch.kron(G, A)
        v = float(blk.abs().max())
        d_in, d_out = A.shape[0], G.shape[0]
        _heat(axes[row, 0], blk, f"F_{row + 1}{row + 1} ({blk.shape[0]}×{blk.shape[0]})", v)
        _heat(axes[row, 1], kron, f"G ⊗ A = {d_out}×{d_out} ⊗ {d_in}×{d_in} (row-major)", v)
        _heat(axes[row, 2], blk - kron, "F_ii − G ⊗ A", v)
        _heat(axes[row, 3], A, f"A_{row + 1} ({d_in}×{d_in}), layer {name}")
        _heat(axes[row, 4], G, f"G_{row + 1} ({d_out}×{d_out})")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


# ---------------------------------------------------------------------------------- experiment


@register(EXPERIMENT, title="K-FAC anatomy on the 3-4-2 THOR network",
          paper="Martens & Grosse 2015; Grosse & Martens 2016; George et al. 2018")
def kfac_anatomy(ctx: Context) -> Outcome:
    """Fisher anatomy, exact identities and inversion costs (quick: a few seconds on CPU)."""
    out = ctx.experiment_dir(EXPERIMENT)
    n = 1024 if ctx.full else 256
    true = compute_anatomy(n=n, fisher="type2")
    emp = compute_anatomy(n=n, fisher="empirical")
    claims: list[Claim] = []

    # identities
    net = make_thor_net()
    x, y = make_data(n)
    enum = exact_fisher_by_enumeration(net, x[:64])
    ggn64 = GGN(net, nn.CrossEntropyLoss(), (x[:64], y[:64])).to_dense()
    e = _rel(ggn64, enum)
    claims.append(Claim("true Fisher (enumerated over classes) = GGN for softmax/CE", e < 1e-10,
                        f"relative difference {e:.1e}"))
    single = compute_anatomy(n=1, fisher="type2")
    e1 = _rel(single.kfac, single.block_diagonal())
    claims.append(Claim("one example: K-FAC = exact diagonal blocks", e1 < 1e-10,
                        f"relative difference {e1:.1e}"))
    lin = make_thor_net(activation=False)
    xl, yl = make_data(n)
    tl = torch.randn(n, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    del yl
    g_lin = GGN(lin, nn.MSELoss(), (xl, tl)).to_dense()
    k_lin = KFAC(lin, nn.MSELoss(), (xl, tl)).to_dense()
    kt_lin = KFAC(lin, nn.MSELoss(), (xl, tl), structure="block-tridiagonal").to_dense()
    e2 = _rel(k_lin, torch.block_diag(g_lin[:12, :12], g_lin[12:, 12:]))
    e3 = _rel(kt_lin, g_lin)
    claims.append(Claim("deep linear net + MSE: K-FAC block-diagonal = exact diagonal blocks",
                        e2 < 1e-10, f"relative difference {e2:.1e}"))
    claims.append(Claim("deep linear net + MSE (2 layers): K-FAC tridiagonal = exact GGN",
                        e3 < 1e-10, f"relative difference {e3:.1e}"))
    a1, g1 = true.factors["0"]
    kcomm = commutation_matrix(4, 3)
    e4 = _rel(kcomm @ torch.kron(a1, g1) @ kcomm.T, torch.kron(g1, a1))
    claims.append(Claim("paper order A⊗G (3×3⊗4×4) = curvlab order G⊗A up to the commutation "
                        "permutation", e4 < 1e-14, f"relative difference {e4:.1e}"))

    # relations between approximations
    for an, label in ((true, "true Fisher"), (emp, "empirical Fisher")):
        er = an.errors
        claims.append(Claim(
            f"{label}: exact diagonal blocks are the best block-diagonal fit (error ≤ K-FAC)",
            er["block-diagonal (exact blocks)"] <= er["K-FAC block-diagonal"] + 1e-12,
            f"{er['block-diagonal (exact blocks)']:.3f} ≤ {er['K-FAC block-diagonal']:.3f}"))
        claims.append(Claim(
            f"{label}: EKFAC fits each diagonal block at least as well as K-FAC",
            all(er[f"EKFAC block {i} vs F_{i}{i}"] <= er[f"K-FAC block {i} vs F_{i}{i}"] + 1e-12
                for i in (1, 2)),
            ", ".join(f"block {i}: {er[f'EKFAC block {i} vs F_{i}{i}']:.3f} vs "
                      f"{er[f'K-FAC block {i} vs F_{i}{i}']:.3f}" for i in (1, 2))))
        claims.append(Claim(
            f"{label}: K-FAC tridiagonal is closer to F than K-FAC block-diagonal",
            er["K-FAC block-tridiagonal"] < er["K-FAC block-diagonal"],
            f"{er['K-FAC block-tridiagonal']:.3f} vs {er['K-FAC block-diagonal']:.3f} "
            "(observed on this network and seed; not a theorem)"))
    ef_vs_f = _rel(emp.F, true.F)

    widths = [4, 8, 16, 24, 32] if ctx.full else [4, 8, 16, 24]
    costs = inversion_costs(widths, repeats=7 if ctx.full else 5)
    costs.to_csv(out / "inversion_costs.csv", index=False)
    last = costs.iloc[-1]
    claims.append(Claim("FLOPs: Kronecker ≪ block-diagonal ≪ dense at every width",
                        bool(((costs.flops_kronecker < costs.flops_block)
                              & (costs.flops_block < costs.flops_dense)).all()),
                        f"w={int(last.width)}: {int(last.flops_kronecker):,} / "
                        f"{int(last.flops_block):,} / {int(last.flops_dense):,}"))
    claims.append(Claim(f"timing at w={int(last.width)}: Kronecker inversion faster than dense",
                        bool(last.time_kronecker_s < last.time_dense_s),
                        f"{last.time_kronecker_s * 1e6:.0f} µs vs {last.time_dense_s * 1e6:.0f} µs"
                        f" (ratio {last.time_ratio_dense_over_kron:.0f}×)"))

    rows = []
    for an in (true, emp):
        for k, v in an.errors.items():
            rows.append({"fisher": "true" if an.fisher_type == "type2" else "empirical",
                         "approximation": k, "relative_frobenius_error": v})
    table = pd.DataFrame(rows)
    table.to_csv(out / "errors.csv", index=False)
    figures = [_save(plot_fisher(true), out / "fisher_true.png"),
               _save(plot_blocks(true), out / "blocks_true.png"),
               _save(plot_fisher(emp), out / "fisher_empirical.png"),
               _save(plot_blocks(emp), out / "blocks_empirical.png")]
    notes = (f"n={n} examples, seed 0, float64. Relative error of the empirical vs the true "
             f"Fisher: {ef_vs_f:.3f}. Layers: {[lay.name for lay in find_layers(net).layers]}.")
    return Outcome(table, claims, figures, notes,
                   key_numbers={"K-FAC rel. error (true F)": true.errors["K-FAC block-diagonal"],
                                "tridiag rel. error (true F)":
                                    true.errors["K-FAC block-tridiagonal"],
                                "EF vs F rel. error": ef_vs_f})
