"""Figures of the transformer language-model study (:mod:`.transformer_lm`).

Example:
    >>> import tempfile
    >>> tr = pd.DataFrame({"method": "AdamW", "iteration": [0, 1], "time_s": [0.0, 0.1],
    ...                    "train_loss": [5.5, 4.0], "val_loss": [5.5, 4.1]})
    >>> eos = pd.DataFrame({"lr": 0.1, "step": [0, 1], "loss": [5.5, 5.0],
    ...                     "hessian_top": [10.0, 30.0], "two_over_lr": 20.0})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     [p.name for p in draw_figures(tr, tr.iloc[:0], eos, Path(tmp))]
    ['training_loss.png', 'validation_loss.png', 'edge_of_stability.png']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from curvlab.experiments.harness.plotting import line_panels, save
from curvlab.problems.transformer import BLOCK_NAMES

__all__ = ["block_table", "draw_figures"]


def block_table(curv: pd.DataFrame, prefix: str = "ggn_diag_mean_") -> pd.DataFrame:
    """Blocks × checkpoint iterations of the columns ``<prefix><block>`` (seed mean).

    Example:
        >>> c = pd.DataFrame({"iteration": [0, 10], "ggn_diag_mean_mlp": [1.0, 2.0]})
        >>> block_table(c).loc["mlp"].tolist()
        [1.0, 2.0]
    """
    cols = [f"{prefix}{b}" for b in BLOCK_NAMES if f"{prefix}{b}" in curv]
    table = curv.groupby("iteration")[cols].mean().T
    table.index = [c[len(prefix):] for c in cols]
    return table


def _curvature_figure(curv: pd.DataFrame) -> Figure:
    mean = curv.groupby("iteration").mean(numeric_only=True)
    fig = Figure(figsize=(12.6, 3.4), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(mean.index, mean["hessian_top"], "o-", label="Hessian λ_max")
    ax1.plot(mean.index, mean["ggn_top"], "s--", label="GGN λ_max")
    ax1.set(xlabel="iterations (AdamW reference)", ylabel="top eigenvalue", yscale="log")
    ax1.legend(fontsize=8)
    for name, mark in (("hessian", "o-"), ("ggn", "s--")):
        ax2.errorbar(mean.index, mean[f"{name}_trace"], yerr=2 * mean[f"{name}_trace_se"],
                     fmt=mark, capsize=3, label=f"tr({name.upper() if name == 'ggn' else 'H'})")
    ax2.set(xlabel="iterations (AdamW reference)", ylabel="Hutchinson trace (±2 s.e.)")
    ax2.legend(fontsize=8)
    table = block_table(curv)
    arr = np.log10(np.clip(table.to_numpy(dtype=float), 1e-12, None))
    im = ax3.imshow(arr, cmap="magma", aspect="auto")
    ax3.set_xticks(range(table.shape[1]), [f"{c:g}" for c in table.columns], fontsize=8)
    ax3.set_yticks(range(table.shape[0]), list(table.index), fontsize=8)
    ax3.set(xlabel="iteration", title="mean GGN diagonal per block (log10)")
    for (r, c), v in np.ndenumerate(table.to_numpy(dtype=float)):
        ax3.text(c, r, f"{v:.1e}", ha="center", va="center", fontsize=7,
                 color="w" if arr[r, c] < arr.mean() else "k")
    fig.colorbar(im, ax=ax3, shrink=0.8)
    fig.suptitle("Curvature over training (fixed batch)")
    return fig


def _eos_figure(eos: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for i, (lr, grp) in enumerate(eos.groupby("lr")):
        color = f"C{i}"
        ax1.plot(grp["step"], grp["hessian_top"], "o-", color=color, ms=3, label=f"lr {lr:g}")
        ax1.axhline(2 / lr, color=color, ls=":", lw=1)
        ax2.plot(grp["step"], grp["loss"], color=color, label=f"lr {lr:g}")
    ax1.set(xlabel="GD step", ylabel="Hessian λ_max (dotted: 2/lr)")
    ax2.set(xlabel="GD step", ylabel="training loss (fixed batch)")
    ax1.legend(fontsize=8)
    fig.suptitle("Full-batch GD at a fixed learning rate: edge of stability")
    return fig


def draw_figures(best_trace: pd.DataFrame, curv: pd.DataFrame, eos: pd.DataFrame,
                 out: Path) -> list[Path]:
    """Save the loss curves (per step and per second), the curvature panel and the
    edge-of-stability panel under ``out``; returns the paths (panels without data are skipped).
    """
    figures: list[Path] = []
    if not best_trace.empty:
        for y, name, title in (("train_loss", "training_loss.png", "training loss"),
                               ("val_loss", "validation_loss.png", "validation loss")):
            fig = line_panels(best_trace, x=["iteration", "time_s"], y=y, hue="method",
                              title=f"Transformer LM on pydoc topics: {title} (nats/token)")
            figures.append(save(fig, out / name))
    if not curv.empty:
        figures.append(save(_curvature_figure(curv), out / "curvature.png"))
    if not eos.empty:
        figures.append(save(_eos_figure(eos), out / "edge_of_stability.png"))
    return figures
