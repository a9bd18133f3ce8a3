"""Old import path of :mod:`curvlab.experiments.studies.curvature_products`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.curvature_products import (
    NAME,
    curvature_products,
    curvature_study,
    plot_heatmaps,
    plot_spectra,
    study_settings,
)

__all__ = [
    "NAME",
    "curvature_products",
    "curvature_study",
    "plot_heatmaps",
    "plot_spectra",
    "study_settings",
]
