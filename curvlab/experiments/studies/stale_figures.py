"""Figures of the stale-statistics study: training curves against iterations and optimizer
time, the per-layer refresh-interval heat map (from the runs' ``refresh_log``), and the
split-dimension trade-off (preconditioning cost against the split inverse's error and loss).

Example:
    >>> import pandas as pd, tempfile, pathlib
    >>> log = pd.DataFrame({"step": [0, 2, 0], "layer": ["fc", "fc", "conv"],
    ...                     "what": "inverse", "method": "m"})
    >>> table = pd.DataFrame({"method": ["m"], "part": ["refresh"]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = interval_figure(log, table, 4, pathlib.Path(tmp) / "f.png")
    ...     p.stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from curvlab.experiments.harness.plotting import line_panels, save
from curvlab.experiments.studies.stale_tools import interval_grid

__all__ = ["curves_figure", "interval_figure", "split_figure"]


def curves_figure(curves: pd.DataFrame, path: Path) -> Path:
    """Training loss and validation accuracy against iterations and optimizer seconds (one
    line per method; the split variants are left out for legibility)."""
    part = curves[curves["part"] != "split"] if "part" in curves else curves
    long = pd.concat([part.assign(metric="training loss", value=part["train_loss"]),
                      part.assign(metric="validation accuracy", value=part["val_accuracy"])])
    fig = line_panels(long, x=["iteration", "time_s"], y="value", hue="method", row="metric",
                      title="Stale statistics: training loss / validation accuracy")
    for ax in fig.axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
    for ax in fig.axes[2:]:
        ax.set_ylabel("validation accuracy")
    return save(fig, path)


def interval_figure(logs: pd.DataFrame, table: pd.DataFrame, steps: int, path: Path) -> Path:
    """Heat map per stale K-FAC method: rows = layers, columns = steps, colour = the realized
    inverse-refresh interval (steps between consecutive refreshes of that layer's inverse);
    for SP-NGD also the factor-update interval."""
    methods = [m for m in table.loc[table["part"] == "refresh", "method"]
               if m in set(logs["method"])]
    panels: list[tuple[str, pd.DataFrame]] = []
    for m in methods:
        log = logs[logs["method"] == m]
        panels.append((f"{m}: inverse", interval_grid(log, steps, "inverse")))
        if m.startswith("SP-NGD"):
            panels.append((f"{m}: factors", interval_grid(log, steps, "factor")))
    top = max((float(np.nanmax(g.to_numpy())) for _, g in panels if g.size), default=1.0)
    fig = Figure(figsize=(6.4, 1.0 + 0.9 * len(panels)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
    im = None
    for ax, (title, grid) in zip(axes, panels):
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma_r", vmin=1,
                       vmax=max(top, 2.0), interpolation="nearest")
        ax.set_yticks(range(len(grid)), [f"layer {n}" for n in grid.index], fontsize=6)
        ax.set_title(title, fontsize=8)
    axes[-1].set_xlabel("step")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="refresh interval (steps)", shrink=0.8)
    return save(fig, path)


def split_figure(split: pd.DataFrame, path: Path) -> Path:
    """Preconditioning time against the split inverse's relative error, and training loss
    against ``split_dim`` (``none`` = unsplit)."""
    fig = Figure(figsize=(9.0, 3.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    labels = [str(k) for k in split["split_dim"]]
    err = split["rel_error"].clip(lower=1e-12)
    ax1.plot(err, split["precondition_ms"], "o-")
    for x, y, lab in zip(err, split["precondition_ms"], labels):
        ax1.annotate(lab, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax1.set_xscale("log")
    ax1.set_xlabel("relative error of split inverse · g")
    ax1.set_ylabel("engine.precondition (ms)")
    ax2.bar(labels, split["refresh_ms"])
    ax2.set_xlabel("split_dim")
    ax2.set_ylabel("eigendecompositions (ms)")
    ax3.plot(labels, split["final_train_loss"], "o-")
    ax3.set_yscale("log")
    ax3.set_xlabel("split_dim")
    ax3.set_ylabel("final training loss")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.suptitle("THOR block splitting: cost against accuracy")
    return save(fig, path)
