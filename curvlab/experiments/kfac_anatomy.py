"""Old import path of :mod:`curvlab.experiments.studies.kfac_anatomy`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.kfac_anatomy import *  # noqa: F403
from curvlab.experiments.studies.kfac_anatomy import __all__  # noqa: F401
