"""Old import path of the training loop and its helpers, now split by concern.

:mod:`curvlab.experiments.harness.training` (training loop),
:mod:`curvlab.experiments.harness.selection` (best setting, time to target) and
:mod:`curvlab.experiments.harness.threads` (thread pinning); this module re-exports their public
names.
"""

from curvlab.experiments.harness import selection, threads
from curvlab.experiments.harness import training as _loop
from curvlab.experiments.harness.selection import *  # noqa: F403
from curvlab.experiments.harness.threads import *  # noqa: F403
from curvlab.experiments.harness.training import *  # noqa: F403

__all__ = [*_loop.__all__, *selection.__all__, *threads.__all__]
