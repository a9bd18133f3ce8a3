"""Old import path of :mod:`curvlab.experiments.harness.plotting`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.plotting import *  # noqa: F403
from curvlab.experiments.harness.plotting import __all__  # noqa: F401
