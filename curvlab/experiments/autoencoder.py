"""Old import path of :mod:`curvlab.experiments.studies.autoencoder`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.autoencoder import *  # noqa: F403
from curvlab.experiments.studies.autoencoder import __all__  # noqa: F401
