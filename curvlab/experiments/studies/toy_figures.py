"""Figure 1 analogue of the CurveBall toy problems: trajectories and loss curves.

Example:
    >>> import tempfile
    >>> tr = pd.DataFrame({"problem": "rosenbrock", "noise_scale": 0.0, "optimizer": "sgd",
    ...                    "iteration": [0, 1], "loss": [1.0, 0.5], "u": [0.0, 0.5],
    ...                    "v": [0.0, 0.2]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     paths = draw_figure1(tr, Path(tmp), labels={"sgd": "SGD"}, tolerance=1e-4,
    ...                          title=lambda p, s: p)
    ...     [p.name for p in paths if p.exists()]
    ['figure1_trajectories.png', 'figure1_loss.png']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["draw_figure1"]


def draw_figure1(trace: pd.DataFrame, out_dir: Path, *, labels: Mapping[str, str],
                 tolerance: float, title: Callable[[str, float], str]) -> list[Path]:
    """Rosenbrock trajectories on the contour, and noise-free loss vs iteration per problem.

    ``trace`` has columns ``problem``, ``noise_scale``, ``optimizer``, ``iteration``, ``loss``
    (and ``u``, ``v`` on Rosenbrock); ``labels`` names the optimizers, ``title(problem,
    noise_scale)`` the panels; ``tolerance`` is drawn as a dotted line. Writes
    ``figure1_trajectories.png`` and ``figure1_loss.png`` under ``out_dir``; returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def _save(fig, path: Path) -> Path:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    paths = []
    rosen = trace[trace["problem"] == "rosenbrock"]
    scales = sorted(rosen["noise_scale"].unique())
    fig, axes = plt.subplots(1, len(scales), figsize=(4.2 * len(scales), 3.8), squeeze=False)
    uu, vv = np.meshgrid(np.linspace(-1.0, 1.5, 200), np.linspace(-0.75, 1.5, 200))
    ff = (1 - uu) ** 2 + 100 * (vv - uu**2) ** 2
    for ax, scale in zip(axes[0], scales, strict=True):
        ax.contour(uu, vv, np.log10(ff + 1e-12), levels=20, cmap="Greys", linewidths=0.6)
        for name, grp in rosen[rosen["noise_scale"] == scale].groupby("optimizer"):
            ax.plot(grp["u"], grp["v"], ".-", ms=2, lw=0.8, label=labels[name])
        ax.plot([1], [1], "k*", ms=10)
        ax.set_xlim(-1.0, 1.5)
        ax.set_ylim(-0.75, 1.5)
        ax.set_title(title("rosenbrock", scale))
        ax.set_xlabel("u")
        ax.set_ylabel("v")
    axes[0][0].legend(fontsize=7)
    paths.append(_save(fig, out_dir / "figure1_trajectories.png"))

    groups = list(trace.groupby(["problem", "noise_scale"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.5), squeeze=False)
    for ax, ((problem, scale), grp) in zip(axes[0], groups, strict=True):
        for name, g in grp.groupby("optimizer"):
            ax.semilogy(g["iteration"], g["loss"].clip(lower=1e-12), lw=1,
                        label=labels[name])
        ax.axhline(tolerance, color="k", ls=":", lw=0.8)
        ax.set_title(title(problem, scale))
        ax.set_xlabel("iteration")
        ax.set_ylabel("noise-free loss")
    axes[0][0].legend(fontsize=7)
    paths.append(_save(fig, out_dir / "figure1_loss.png"))
    return paths
