r"""Curvature matrices of a small digits MLP: Hessian, GGN, Fisher (MC), empirical Fisher.

Builds each :mod:`curvlab.operators` curvature operator on a tanh MLP (64-h-10, float64) over
``num_data`` digits images split into two uneven batches, materializes them, and checks the
relations that hold by construction or in expectation:

* GGN and both Fishers are PSD; the Hessian is in general indefinite.
* Hessian = GGN + residual :math:`\sum_n \sum_k (\partial\ell_n/\partial f_k) \nabla^2 f_k`;
  restricted to the last layer (the network is linear in those parameters) the residual vanishes
  and Hessian = GGN exactly.
* Lanczos (matrix-free) top eigenvalues match ``torch.linalg.eigvalsh`` of the dense matrix.
* Hutchinson's trace estimate is within 4 standard errors of the exact trace.
* The Monte-Carlo Fisher converges to the GGN as samples grow (relative error ~ S^{-1/2}).
* The empirical Fisher differs from the Fisher in general.

Also reports the cost of one product relative to one gradient on this (tiny) model; the
meaningful speed numbers come from ``benchmarks/products.py``.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.threads import single_thread
from curvlab.linalg import hutchinson_trace, lanczos
from curvlab.operators import GGN, EmpiricalFisher, Fisher, Hessian

__all__ = [
    "NAME",
    "curvature_products",
    "curvature_study",
    "plot_heatmaps",
    "plot_spectra",
    "study_settings",
]

NAME = "curvature-products"


def study_settings(full: bool) -> dict[str, Any]:
    """Keyword arguments of :func:`curvature_study` for quick (CPU) or full mode.

    Example:
        >>> study_settings(False)["hidden"]
        4
    """
    if full:
        return {"hidden": 16, "num_data": 600, "mc_samples": (1, 16, 256, 4096)}
    return {"hidden": 4, "num_data": 96, "mc_samples": (1, 16, 256)}


def _data(num_data: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from curvlab.data.digits import load_digits

        ds = load_digits(num_test=0, seed=0, device=device, dtype=torch.float64)
        return ds.x_train[:num_data], ds.y_train[:num_data]
    except ImportError:  # pragma: no cover - scikit-learn missing: synthetic stand-in
        g = torch.Generator().manual_seed(0)
        x = torch.rand(num_data, 64, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (num_data,), generator=g)
        return x.to(device), y.to(device)


def curvature_study(
    *,
    hidden: int = 4,
    num_data: int = 96,
    mc_samples: tuple[int, ...] = (1, 16, 256),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Compute every matrix, spectrum, estimate and claim of this experiment.

    Args:
        hidden: Hidden width of the 64-hidden-10 tanh MLP.
        num_data: Number of digits examples, split into batches of ``num_data // 3`` and the
            rest (uneven on purpose).
        mc_samples: Monte-Carlo sample counts for the Fisher convergence check.
        device: Device.
        seed: Seed of the weights, Lanczos start vector and probes.

    Returns:
        Dict with ``dense`` (name -> matrix), ``eigenvalues`` (name -> ascending spectrum),
        ``table`` (per-matrix summary), ``mc`` (Fisher error vs samples), ``cost`` (time per
        product / gradient) and ``claims``.

    Example:
        >>> out = curvature_study(hidden=1, num_data=6, mc_samples=(1, 4))
        >>> sorted(out["dense"])
        ['EmpiricalFisher', 'Fisher', 'GGN', 'Hessian']
    """
    device = torch.device(device)
    with single_thread(enabled=device.type == "cpu"):  # tiny matrices: threads only add overhead
        return _study(hidden, num_data, mc_samples, device, seed)


def _study(hidden, num_data, mc_samples, device, seed) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    model = model.to(device=device, dtype=torch.float64)
    x, y = _data(num_data, device)
    cut = max(1, num_data // 3)
    data = [(x[:cut], y[:cut]), (x[cut:], y[cut:])]
    loss_fn = nn.CrossEntropyLoss()
    ops = {
        "Hessian": Hessian(model, loss_fn, data),
        "GGN": GGN(model, loss_fn, data),
        "Fisher": Fisher(model, loss_fn, data, mc_samples=1, generator=seed),
        "EmpiricalFisher": EmpiricalFisher(model, loss_fn, data),
    }
    dense = {k: op.to_dense() for k, op in ops.items()}
    evals = {k: torch.linalg.eigvalsh(m) for k, m in dense.items()}
    gen = torch.Generator().manual_seed(seed)
    p = ops["GGN"].shape[0]
    rows, claims = [], []
    for name, op in ops.items():
        top = lanczos(op, k=3, num_iter=min(p, 60), generator=gen).eigenvalues
        exact_top = evals[name][-3:]
        tr = hutchinson_trace(op, num_samples=64, generator=gen, batch_size=32)
        exact_tr = float(dense[name].trace())
        lam = evals[name]
        rows.append({
            "matrix": name,
            "P": p,
            "lambda_max": float(lam[-1]),
            "lambda_min": float(lam[0]),
            "lanczos_top1": float(top[-1]),
            "lanczos_rel_err_top3": float(((top - exact_top).abs() / exact_top.abs()).max()),
            "trace": exact_tr,
            "hutchinson": float(tr.estimate),
            "hutchinson_se": float(tr.standard_error),
            "negative_mass": float(lam.clamp_max(0).abs().sum() / lam.abs().sum()),
        })
        claims.append(Claim(
            f"Lanczos top-3 eigenvalues of the {name} match eigvalsh",
            rows[-1]["lanczos_rel_err_top3"] < 1e-6,
            f"max relative error {rows[-1]['lanczos_rel_err_top3']:.1e}"))
        claims.append(Claim(
            f"Hutchinson trace of the {name} within 4 standard errors",
            abs(rows[-1]["hutchinson"] - exact_tr) <= 4 * rows[-1]["hutchinson_se"],
            f"{rows[-1]['hutchinson']:.4g} +- {rows[-1]['hutchinson_se']:.2g} vs {exact_tr:.4g}"))
    table = pd.DataFrame(rows)

    for name in ("GGN", "Fisher", "EmpiricalFisher"):
        lam = evals[name]
        claims.append(Claim(f"{name} is PSD", bool(lam[0] >= -1e-10 * lam[-1]),
                            f"lambda_min = {float(lam[0]):.2e}"))
    h_lam = evals["Hessian"]
    claims.append(Claim("the Hessian is indefinite here", bool(h_lam[0] < -1e-10 * h_lam[-1]),
                        f"lambda_min = {float(h_lam[0]):.2e}"))
    residual = dense["Hessian"] - dense["GGN"]
    rel_res = float(residual.norm() / dense["Hessian"].norm())
    claims.append(Claim("Hessian = GGN + a non-zero residual term", rel_res > 1e-3,
                        f"||H - G|| / ||H|| = {rel_res:.3f}"))
    last = ["2.weight", "2.bias"]
    h_last = Hessian(model, loss_fn, data, params=last).to_dense()
    g_last = GGN(model, loss_fn, data, params=last).to_dense()
    diff_last = float((h_last - g_last).abs().max() / h_last.abs().max())
    claims.append(Claim("last layer only (linear in its parameters): Hessian = GGN exactly",
                        diff_last < 1e-10, f"max |H - G| / max |H| = {diff_last:.1e}"))

    mc_rows = []
    g_norm = dense["GGN"].norm()
    for s in mc_samples:
        f = Fisher(model, loss_fn, data, mc_samples=s, generator=seed + 1).to_dense()
        mc_rows.append({"mc_samples": s, "rel_error": float((f - dense["GGN"]).norm() / g_norm)})
    mc = pd.DataFrame(mc_rows)
    errs = mc["rel_error"].tolist()
    claims.append(Claim("MC Fisher -> GGN as samples grow",
                        all(a > b for a, b in itertools.pairwise(errs)),
                        ", ".join(f"S={s}: {e:.3f}" for s, e in zip(mc_samples, errs,
                                                                     strict=True))))
    ef_diff = float((dense["EmpiricalFisher"] - dense["GGN"]).norm() / g_norm)
    claims.append(Claim("empirical Fisher differs from the Fisher (= GGN for CE)", ef_diff > 0.05,
                        f"||E - G|| / ||G|| = {ef_diff:.3f}"))

    cost = _cost(model, loss_fn, data, ops, p)
    return {"dense": dense, "eigenvalues": evals, "table": table, "mc": mc, "cost": cost,
            "claims": claims, "residual": residual, "num_params": p}


def _cost(model, loss_fn, data, ops, p, repeats: int = 5) -> pd.DataFrame:
    leaves = [q for q in model.parameters() if q.requires_grad]

    def gradient():
        for xb, yb in data:
            torch.autograd.grad(loss_fn(model(xb), yb), leaves)

    v = torch.randn(p, dtype=torch.float64, device=leaves[0].device)
    fns = {"gradient": gradient, **{k: (lambda op=op: op @ v) for k, op in ops.items()}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    return pd.DataFrame([
        {"product": k, "time_ms": 1e3 * t, "ratio_to_gradient": t / med["gradient"]}
        for k, t in med.items()
    ])


def plot_heatmaps(dense: dict[str, torch.Tensor], path: str | Path | None = None):
    """Side-by-side seaborn heatmaps of the dense matrices (symmetric color scale each)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(dense), figsize=(4 * len(dense), 3.6))
    for ax, (name, m) in zip(axes, dense.items(), strict=True):
        a = m.detach().cpu().numpy()
        lim = float(abs(a).max()) or 1.0
        sns.heatmap(a, ax=ax, cmap="RdBu_r", vmin=-lim, vmax=lim, center=0.0, square=True,
                    xticklabels=False, yticklabels=False, cbar_kws={"shrink": 0.7})
        ax.set_title(name)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_spectra(evals: dict[str, torch.Tensor], path: str | Path | None = None):
    """Sorted eigenvalues of each matrix on a symmetric-log axis."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = pd.concat([
        pd.DataFrame({"matrix": k, "index": range(len(v)),
                      "eigenvalue": v.detach().cpu().numpy()[::-1]})
        for k, v in evals.items()
    ])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sns.lineplot(frame, x="index", y="eigenvalue", hue="matrix", ax=ax)
    floor = min(float(v.abs()[v.abs() > 0].min()) for v in evals.values())
    ax.set_yscale("symlog", linthresh=max(floor, 1e-8) * 10)
    ax.set_xlabel("rank (descending)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


@register(NAME, title="Curvature matrices of a digits MLP: Hessian, GGN, Fisher, empirical Fisher",
          paper="Martens 2014 (New insights on natural gradient); Kunstner et al. 2019")
def curvature_products(ctx: Context) -> Outcome:
    """Registered experiment: :func:`curvature_study` plus figures under the results dir."""
    import matplotlib.pyplot as plt

    out_dir = ctx.experiment_dir(NAME)
    study = curvature_study(**study_settings(ctx.full), device=ctx.device)
    figures = []
    for fn, fname, arg in ((plot_heatmaps, "heatmaps.png", study["dense"]),
                           (plot_spectra, "spectra.png", study["eigenvalues"])):
        fig = fn(arg, out_dir / fname)
        plt.close(fig)
        figures.append(out_dir / fname)
    study["mc"].to_csv(out_dir / "mc_fisher.csv", index=False)
    study["cost"].to_csv(out_dir / "cost.csv", index=False)
    top = study["table"].set_index("matrix")["lambda_max"]
    return Outcome(
        study["table"], study["claims"], figures,
        notes=(f"P = {study['num_params']} parameters, float64, two uneven batches; costs on "
               "this tiny model are dominated by Python overhead (see benchmarks/products.py)."),
        key_numbers={f"lambda_max {k}": float(v) for k, v in top.items()}
        | {"MC Fisher rel. error (largest S)": float(study["mc"]["rel_error"].iloc[-1]),
           "sqrt(1/S)": 1 / math.sqrt(int(study["mc"]["mc_samples"].iloc[-1]))},
    )
