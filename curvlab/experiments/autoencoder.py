"""Old import path of :mod:`curvlab.experiments.studies.autoencoder`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.autoencoder import (
    AUTOENCODER_PROBLEMS,
    NAME,
    autoencoder_methods,
    autoencoder_problem,
    deep_autoencoder,
    run_deep_autoencoder,
)

__all__ = [
    "AUTOENCODER_PROBLEMS",
    "NAME",
    "autoencoder_methods",
    "autoencoder_problem",
    "deep_autoencoder",
    "run_deep_autoencoder",
]
