"""Old import path of :mod:`curvlab.experiments.studies.ngd_comparison`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.ngd_comparison import *  # noqa: F403
from curvlab.experiments.studies.ngd_comparison import __all__  # noqa: F401
