"""Old import path of :mod:`curvlab.experiments.harness.reproduce`.

Re-exports its public names; patch attributes on that module, not on this one.
"""

from curvlab.experiments.harness.reproduce import (
    ExperimentReport,
    markdown_table,
    reproduce,
    resolve_names,
    summary_markdown,
)

__all__ = [
    "ExperimentReport",
    "markdown_table",
    "reproduce",
    "resolve_names",
    "summary_markdown",
]
