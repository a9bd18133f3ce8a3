"""Provenance of a result row: code version, library version, device, time.

Every row that :func:`curvlab.experiments.harness.runner.run_all` writes carries these columns, so a
CSV found later says which commit, torch build and device produced it.

Example:
    >>> info = provenance("cpu")
    >>> sorted(info)
    ['device', 'git_commit', 'python_version', 'timestamp', 'torch_version']
    >>> info["device"]
    'cpu'
"""

from __future__ import annotations

import functools
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["PROVENANCE_COLUMNS", "git_commit", "provenance", "resolve_device", "utc_timestamp"]

#: Columns added to every summary row (``seed`` and ``wall_clock_s`` are added by the runner).
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "git_commit",
    "torch_version",
    "python_version",
    "device",
    "timestamp",
)


@functools.lru_cache(maxsize=8)
def git_commit(repo_dir: str | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding curvlab (or ``repo_dir``).

    Returns ``"unknown"`` when git or the repository is not available; a ``+dirty`` suffix is
    added when tracked files differ from HEAD.

    Example:
        >>> isinstance(git_commit(), str)
        True
    """
    cwd = repo_dir or str(Path(__file__).resolve().parents[3])
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return head + ("+dirty" if dirty else "")


def utc_timestamp() -> str:
    """Current UTC time in ISO 8601 with seconds, e.g. ``2026-01-01T12:00:00+00:00``.

    Example:
        >>> utc_timestamp().endswith("+00:00")
        True
    """
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; anything else via ``torch.device``.

    Raises ``ValueError`` for ``"cuda"`` when CUDA is not available, or for an unknown name.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"resolve_device: device={device!r} is not a torch device; expected 'auto', "
            "'cpu' or 'cuda[:N]'"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("resolve_device: device='cuda' requested but CUDA is not available")
    return dev


def provenance(device: str | torch.device) -> dict[str, str]:
    """Provenance columns (see :data:`PROVENANCE_COLUMNS`) for a row computed on ``device``.

    For CUDA devices the GPU name is appended, e.g. ``"cuda:0 (NVIDIA H100)"``.
    """
    dev = torch.device(device)
    name = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"{dev} ({torch.cuda.get_device_name(dev)})"
    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": name,
        "timestamp": utc_timestamp(),
    }
