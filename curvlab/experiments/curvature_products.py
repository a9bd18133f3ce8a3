"""Old import path of :mod:`curvlab.experiments.studies.curvature_products`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.curvature_products import *  # noqa: F403
from curvlab.experiments.studies.curvature_products import __all__  # noqa: F401
