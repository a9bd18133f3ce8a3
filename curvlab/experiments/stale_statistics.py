"""Old import path of :mod:`curvlab.experiments.studies.stale_statistics`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.stale_statistics import *  # noqa: F403
from curvlab.experiments.studies.stale_statistics import __all__  # noqa: F401
