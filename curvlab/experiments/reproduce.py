"""Old import path of :mod:`curvlab.experiments.harness.reproduce`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.reproduce import *  # noqa: F403
from curvlab.experiments.harness.reproduce import __all__  # noqa: F401
