"""Old import path of :mod:`curvlab.experiments.studies.toy_problems`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.toy_problems import (
    ADAM_GRID,
    CURVEBALL_CONFIGS,
    EXPERIMENT,
    OPTIMIZER_LABELS,
    SGD_GRID,
    TOLERANCE,
    ToySettings,
    best_settings,
    curveball_toy,
    load_traces,
    plot_figure1,
    run_one,
    summarize,
    toy_settings,
)

__all__ = [
    "ADAM_GRID",
    "CURVEBALL_CONFIGS",
    "EXPERIMENT",
    "OPTIMIZER_LABELS",
    "SGD_GRID",
    "TOLERANCE",
    "ToySettings",
    "best_settings",
    "curveball_toy",
    "load_traces",
    "plot_figure1",
    "run_one",
    "summarize",
    "toy_settings",
]
