"""Old import path of the training loop and its helpers, now split by concern.

:mod:`curvlab.experiments.harness.training` (training loop), :mod:`~curvlab.experiments.harness.
selection` (best setting, time to target) and :mod:`~curvlab.experiments.harness.threads`
(thread pinning); this module re-exports their public names.
"""

from curvlab.experiments.harness.selection import first_crossing, select_best
from curvlab.experiments.harness.threads import quick_mode_threads, single_thread
from curvlab.experiments.harness.training import (
    BatchSize,
    TrainResult,
    evaluate,
    exponential_batch_schedule,
    train,
)

__all__ = [
    "BatchSize",
    "TrainResult",
    "evaluate",
    "exponential_batch_schedule",
    "first_crossing",
    "quick_mode_threads",
    "select_best",
    "single_thread",
    "train",
]
