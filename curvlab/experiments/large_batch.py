"""Old import path of :mod:`curvlab.experiments.studies.large_batch`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.large_batch import *  # noqa: F403
from curvlab.experiments.studies.large_batch import __all__  # noqa: F401
