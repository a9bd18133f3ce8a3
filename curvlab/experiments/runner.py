"""Old import path of :mod:`curvlab.experiments.harness.runner`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.runner import *  # noqa: F403
from curvlab.experiments.harness.runner import __all__  # noqa: F401
