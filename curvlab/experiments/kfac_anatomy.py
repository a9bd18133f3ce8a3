"""Old import path of :mod:`curvlab.experiments.studies.kfac_anatomy`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.kfac_anatomy import (
    EXPERIMENT,
    Anatomy,
    commutation_matrix,
    compute_anatomy,
    exact_fisher_by_enumeration,
    inversion_costs,
    kfac_anatomy,
    make_data,
    make_thor_net,
    plot_blocks,
    plot_fisher,
)

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
