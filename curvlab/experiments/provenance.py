"""Old import path of :mod:`curvlab.experiments.harness.provenance`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.provenance import *  # noqa: F403
from curvlab.experiments.harness.provenance import __all__  # noqa: F401
