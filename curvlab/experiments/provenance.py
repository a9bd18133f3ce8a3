"""Old import path of :mod:`curvlab.experiments.harness.provenance`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.provenance import (
    PROVENANCE_COLUMNS,
    git_commit,
    provenance,
    resolve_device,
    utc_timestamp,
)

__all__ = [
    "PROVENANCE_COLUMNS",
    "git_commit",
    "provenance",
    "resolve_device",
    "utc_timestamp",
]
