"""Old import path of :mod:`curvlab.experiments.studies.toy_problems`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.toy_problems import *  # noqa: F403
from curvlab.experiments.studies.toy_problems import __all__  # noqa: F401
