"""Old import path of :mod:`curvlab.experiments.harness.optimizers`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.optimizers import *  # noqa: F403
from curvlab.experiments.harness.optimizers import __all__  # noqa: F401
