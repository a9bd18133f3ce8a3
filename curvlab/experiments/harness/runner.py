"""Resumable execution of experiment runs with tidy CSV output.

A :class:`Run` is one (experiment, config, seed) triple; its :attr:`Run.key` is a stable hash of
those three. :func:`run_all` calls ``fn(run)`` for every run whose key is not yet recorded in
``out_dir/<experiment>/summary.csv`` and appends the rows of each finished run immediately, so an
interrupted sweep (Ctrl-C, crash) keeps everything that finished and re-running it computes only
what is missing.

Files under ``out_dir/<experiment>/``:

* ``summary.csv`` — one row per run: ``key, experiment, seed``, the flattened config columns
  (nested mappings become ``outer.inner``), the result's summary fields, ``wall_clock_s`` and the
  provenance columns (:data:`~curvlab.experiments.harness.provenance.PROVENANCE_COLUMNS`).
* ``trace.csv`` — optional per-iteration rows of every run, each tagged with ``key`` and ``seed``
  and the config columns (tidy format: ready for ``seaborn.lineplot(hue=...)``).

A run's trace is written before its summary row; the summary row is the commit marker. Trace rows
of runs without a summary row (an interrupted run) are discarded when the sweep is resumed.

Example:
    >>> import tempfile
    >>> runs = [Run("demo", {"lr": lr}, seed=0) for lr in (0.1, 1.0)]
    >>> calls = []
    >>> def fn(run):
    ...     calls.append(run.config["lr"])
    ...     return RunResult({"loss": 1.0 / run.config["lr"]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     summary, _ = run_all(runs, fn, tmp, progress=False)
    ...     _ = run_all(runs, fn, tmp, progress=False)   # resumed: nothing left to do
    >>> calls
    [0.1, 1.0]
    >>> summary["loss"].tolist()
    [10.0, 1.0]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from curvlab.experiments.harness.provenance import provenance

__all__ = [
    "RESERVED_COLUMNS",
    "Run",
    "RunResult",
    "flatten_config",
    "read_results",
    "run_all",
]

#: Column names the runner writes itself; config keys and result fields may not use them.
RESERVED_COLUMNS: tuple[str, ...] = (
    "key",
    "experiment",
    "seed",
    "wall_clock_s",
    "git_commit",
    "torch_version",
    "python_version",
    "device",
    "timestamp",
)


def _canonical_json(value: Any, *, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Run: {what} must be JSON-serializable (str, int, float, bool, None, lists and "
            f"mappings of these); got {value!r}: {err}"
        ) from err


@dataclass(frozen=True)
class Run:
    """One unit of work: an experiment name, a JSON-serializable config and a seed.

    Attributes:
        experiment: Experiment name and sub-directory of ``out_dir`` (e.g. ``"toy-rosenbrock"``).
        config: JSON-serializable settings (optimizer name, hyperparameters, problem settings).
        seed: Random seed of this run.

    Example:
        >>> a = Run("demo", {"lr": 0.1, "opt": "sgd"}, seed=0)
        >>> b = Run("demo", {"opt": "sgd", "lr": 0.1}, seed=0)
        >>> a.key == b.key, len(a.key)
        (True, 16)
        >>> a.key == Run("demo", {"lr": 0.1, "opt": "sgd"}, seed=1).key
        False
    """

    experiment: str
    config: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(f"Run: experiment must be a non-empty str, got {self.experiment!r}")
        if any(c in self.experiment for c in "/\\") or self.experiment.startswith("."):
            raise ValueError(
                f"Run: experiment {self.experiment!r} is used as a directory name; it may not "
                "contain path separators or start with '.'"
            )
        if not isinstance(self.config, Mapping):
            raise TypeError(f"Run: config must be a Mapping, got {type(self.config).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Run: seed must be an int, got {self.seed!r}")
        _canonical_json(dict(self.config), what="config")
        clash = set(flatten_config(self.config)) & set(RESERVED_COLUMNS)
        if clash:
            raise ValueError(f"Run: config keys {sorted(clash)} clash with runner columns")

    @property
    def key(self) -> str:
        """Stable 16-hex-digit hash of ``(experiment, config with sorted keys, seed)``."""
        payload = _canonical_json(
            {"experiment": self.experiment, "config": dict(self.config), "seed": self.seed},
            what="config",
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass
class RunResult:
    """What ``fn(run)`` returns to :func:`run_all`.

    Attributes:
        summary: One row of scalar results, e.g. ``iterations_to_tol``, ``solved``, ``final_loss``.
        trace: Optional per-iteration rows (``iteration``, ``loss``, ``time_s``, ...).

    Example:
        >>> RunResult({"final_loss": 0.5}, trace=[{"iteration": 0, "loss": 1.0}]).summary
        {'final_loss': 0.5}
    """

    summary: dict[str, Any]
    trace: list[dict[str, Any]] | None = None


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``outer.inner`` keys; lists become JSON strings.

    Example:
        >>> flatten_config({"opt": "kfac", "hyper": {"lr": 0.1, "damping": 1e-3}, "sizes": [1, 2]})
        {'opt': 'kfac', 'hyper.lr': 0.1, 'hyper.damping': 0.001, 'sizes': '[1, 2]'}
    """
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if not isinstance(name, str):
            raise TypeError(f"flatten_config: config keys must be str, got {name!r}")
        full = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{full}."))
        elif isinstance(value, (list, tuple)):
            flat[full] = json.dumps(list(value))
        else:
            flat[full] = value
    return flat


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"run_all: result tensors must be scalars, got shape {tuple(value.shape)}"
            )
        return value.item()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()  # numpy scalars
        except (TypeError, ValueError):
            return value
    return value


def _csv_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open("r", newline="") as handle:
        first = handle.readline()
    return pd.read_csv(io.StringIO(first)).columns.tolist() if first.strip() else None


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"key": str, "experiment": str})


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV; rewrite it atomically when the rows bring new columns."""
    if not rows:
        return
    new = pd.DataFrame(rows)
    header = _csv_header(path)
    if header is None:
        _write_atomic(new, path)
        return
    if set(new.columns) <= set(header):
        text = new.reindex(columns=header).to_csv(index=False, header=False)
        with path.open("a", newline="") as handle:  # one write: complete rows or none
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return
    old = _read_csv(path)
    columns = header + [c for c in new.columns if c not in header]
    _write_atomic(pd.concat([old, new], ignore_index=True).reindex(columns=columns), path)


def read_results(out_dir: str | Path, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``(summary, trace)`` of ``experiment`` under ``out_dir`` (empty frames if absent).

    Trace rows of runs without a summary row (an interrupted run) are left out.
    """
    exp_dir = Path(out_dir) / experiment
    summary = _read_csv(exp_dir / "summary.csv")
    trace = _read_csv(exp_dir / "trace.csv")
    if not trace.empty:
        done = set(summary["key"]) if "key" in summary else set()
        trace = trace[trace["key"].isin(done)].reset_index(drop=True)
    return summary, trace


def _drop_orphan_trace(exp_dir: Path, done: set[str]) -> None:
    path = exp_dir / "trace.csv"
    trace = _read_csv(path)
    if trace.empty or "key" not in trace:
        return
    keep = trace["key"].isin(done)
    if not keep.all():
        _write_atomic(trace[keep], path)


def run_all(
    runs: Sequence[Run],
    fn: Callable[[Run], RunResult],
    out_dir: str | Path,
    *,
    desc: str = "",
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Execute ``fn(run)`` for every run not yet recorded under ``out_dir/<experiment>/``.

    The rows of each finished run are appended to ``summary.csv`` / ``trace.csv`` right away
    (Ctrl-C keeps finished runs); rows carry the run key, flattened config columns, seed, the
    result fields, ``wall_clock_s`` (time spent in ``fn``) and the provenance columns
    (``git_commit``, ``torch_version``, ``python_version``, ``device``, ``timestamp``).
    Exceptions raised by ``fn`` (including ``KeyboardInterrupt``) propagate after the rows of
    earlier runs were written.

    Args:
        runs: Runs to execute; duplicates (same key) are executed once.
        fn: Computes one run; must return a :class:`RunResult`.
        out_dir: Root results directory.
        desc: tqdm description.
        progress: Show a tqdm progress bar.
        device: Device recorded in the provenance columns.

    Returns:
        ``(summary_df, trace_df)`` restricted to ``runs`` (summary in the order of ``runs``).
    """
    if isinstance(runs, Run):
        raise TypeError("run_all: runs must be a sequence of Run, got a single Run")
    runs = list(runs)
    for run in runs:
        if not isinstance(run, Run):
            raise TypeError(f"run_all: runs must contain Run objects, got {type(run).__name__}")
    out = Path(out_dir)
    unique: dict[str, Run] = {}
    for run in runs:
        unique.setdefault(run.key, run)

    done: dict[str, set[str]] = {}
    for experiment in {run.experiment for run in unique.values()}:
        exp_dir = out / experiment
        exp_dir.mkdir(parents=True, exist_ok=True)
        summary = _read_csv(exp_dir / "summary.csv")
        done[experiment] = set(summary["key"]) if "key" in summary else set()
        _drop_orphan_trace(exp_dir, done[experiment])

    todo = [run for run in unique.values() if run.key not in done[run.experiment]]
    bar = tqdm(total=len(unique), initial=len(unique) - len(todo), desc=desc or None,
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for run in todo:
            label = ", ".join(f"{k}={v}" for k, v in flatten_config(run.config).items())
            bar.set_postfix_str(label[:60])
            start = time.perf_counter()
            result = fn(run)
            elapsed = time.perf_counter() - start
            if not isinstance(result, RunResult):
                raise TypeError(
                    f"run_all: fn must return a RunResult, got {type(result).__name__} for run "
                    f"{run.experiment}/{run.key}"
                )
            _record(out / run.experiment, run, result, elapsed, device)
            bar.update(1)
    finally:
        bar.close()

    keys = list(unique)
    frames = [read_results(out, exp) for exp in sorted({r.experiment for r in unique.values()})]
    summary = pd.concat([f[0] for f in frames], ignore_index=True) if frames else pd.DataFrame()
    trace = pd.concat([f[1] for f in frames], ignore_index=True) if frames else pd.DataFrame()
    if not summary.empty:
        order = {k: i for i, k in enumerate(keys)}
        summary = summary[summary["key"].isin(order)]
        summary = summary.sort_values("key", key=lambda s: s.map(order), kind="stable")
        summary = summary.reset_index(drop=True)
    if not trace.empty:
        trace = trace[trace["key"].isin(set(keys))].reset_index(drop=True)
    return summary, trace


def _record(exp_dir: Path, run: Run, result: RunResult, elapsed: float, device: Any) -> None:
    config = flatten_config(run.config)
    summary = {k: _scalar(v) for k, v in result.summary.items()}
    for name in summary:
        if name in RESERVED_COLUMNS or name in config:
            raise ValueError(
                f"run_all: result field {name!r} of {run.experiment} clashes with a runner or "
                "config column; rename it"
            )
    row: dict[str, Any] = {"key": run.key, "experiment": run.experiment, "seed": run.seed}
    row.update(config)
    row.update(summary)
    row["wall_clock_s"] = elapsed
    row.update(provenance(device))
    if result.trace:
        trace_rows = []
        for step in result.trace:
            trow = {"key": run.key, "seed": run.seed, **config}
            trow.update({k: _scalar(v) for k, v in step.items()})
            trace_rows.append(trow)
        _append_rows(exp_dir / "trace.csv", trace_rows)
    _append_rows(exp_dir / "summary.csv", [row])
