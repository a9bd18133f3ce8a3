"""Old import path of :mod:`curvlab.experiments.studies.transformer_lm`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.transformer_lm import *  # noqa: F403
from curvlab.experiments.studies.transformer_lm import __all__  # noqa: F401
