"""Old import path of :mod:`curvlab.experiments.harness.plotting`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.plotting import (
    heatmap_panels,
    line_panels,
    save,
)

__all__ = [
    "heatmap_panels",
    "line_panels",
    "save",
]
