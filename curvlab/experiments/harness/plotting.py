"""Figures of the experiments, drawn on ``matplotlib.figure.Figure`` (no pyplot state, works
under any backend) and saved as PNG.

Example:
    >>> import pandas as pd, tempfile, pathlib
    >>> tr = pd.DataFrame({"iteration": [0, 1, 0, 1], "train_error": [1.0, 0.5, 1.0, 0.8],
    ...                    "method": ["a", "a", "b", "b"]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     fig = line_panels(tr, x=["iteration"], y="train_error", hue="method")
    ...     path = save(fig, pathlib.Path(tmp) / "f.png")
    ...     path.stat().st_size > 0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["heatmap_panels", "line_panels", "save"]

_LABELS = {
    "iteration": "iterations", "time_s": "optimizer wall-clock (s)",
    "train_error": "training error", "val_error": "validation error",
    "train_loss": "training loss",
}


def line_panels(trace: pd.DataFrame, *, x: Sequence[str], y: str, hue: str,
                row: str | None = None, logy: bool = False, logx: bool = False,
                title: str = "") -> Figure:
    """Grid of line plots: columns = ``x`` variables, rows = values of ``row``; one line per
    ``hue`` value (mean over seeds at equal iteration; time is averaged the same way)."""
    rows = list(pd.unique(trace[row])) if row else [None]
    fig = Figure(figsize=(4.2 * len(x), 3.2 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), len(x), squeeze=False))
    for i, rv in enumerate(rows):
        part = trace if rv is None else trace[trace[row] == rv]
        for j, xv in enumerate(x):
            ax = axes[i, j]
            for label, grp in part.groupby(hue, sort=False):
                mean = grp.groupby("iteration", sort=True)[[xv, y]].mean() if xv != "iteration" \
                    else grp.groupby("iteration", sort=True)[[y]].mean().reset_index()
                ax.plot(mean[xv], mean[y], label=str(label), lw=1.5)
            ax.set_xlabel(_LABELS.get(xv, xv))
            ax.set_ylabel(_LABELS.get(y, y))
            if logy:
                ax.set_yscale("log")
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if rv is not None:
                ax.set_title(f"{row} = {rv}", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def heatmap_panels(tables: Sequence[tuple[str, pd.DataFrame]], *, title: str = "",
                   cbar_label: str = "", vmax: float | None = None) -> Figure:
    """One annotated heat map per ``(panel title, 2-D table)``; NaN cells are blank."""
    n = len(tables)
    fig = Figure(figsize=(3.4 * n, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    finite = [t.to_numpy(dtype=float) for _, t in tables]
    top = vmax if vmax is not None else max(
        (np.nanmax(a) for a in finite if np.isfinite(a).any()), default=1.0)
    im = None
    for ax, (name, table), arr in zip(axes, tables, finite):
        im = ax.imshow(arr, cmap="viridis_r", vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(table.shape[1]), [f"{c:g}" for c in table.columns], fontsize=7)
        ax.set_yticks(range(table.shape[0]), [f"{r:g}" for r in table.index], fontsize=7)
        ax.set_xlabel(str(table.columns.name))
        ax.set_ylabel(str(table.index.name))
        ax.set_title(name, fontsize=9)
        for (r, c), v in np.ndenumerate(arr):
            ax.text(c, r, "—" if not np.isfinite(v) else f"{v:.0f}", ha="center", va="center",
                    fontsize=7, color="w" if np.isfinite(v) and v > 0.5 * top else "k")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label=cbar_label, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def save(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
