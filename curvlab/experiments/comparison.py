"""Old import path of :mod:`curvlab.experiments.harness.comparison`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.comparison import *  # noqa: F403
from curvlab.experiments.harness.comparison import __all__  # noqa: F401
