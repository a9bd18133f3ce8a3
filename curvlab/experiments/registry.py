"""Old import path of :mod:`curvlab.experiments.harness.registry`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.registry import *  # noqa: F403
from curvlab.experiments.harness.registry import __all__  # noqa: F401
