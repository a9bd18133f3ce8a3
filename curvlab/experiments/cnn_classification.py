"""Old import path of :mod:`curvlab.experiments.studies.cnn_classification`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.studies.cnn_classification import *  # noqa: F403
from curvlab.experiments.studies.cnn_classification import __all__  # noqa: F401
