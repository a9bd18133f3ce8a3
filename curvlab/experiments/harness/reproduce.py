"""Run registered experiments in turn and summarize them (``python -m curvlab reproduce``).

For each experiment: call it, write ``<out>/<name>/table.csv`` (its result table),
``<out>/<name>/claims.csv`` (claims with provenance), then rewrite ``<out>/summary.md`` (so an
interrupted invocation still leaves a summary of what finished). An experiment that raises is
recorded with its traceback and the others still run; claims that do not hold are findings and
do not count as failures.

Example:
    >>> import tempfile, pandas as pd
    >>> from curvlab.experiments.harness.registry import (
    ...     Claim, Outcome, make_context, register, unregister)
    >>> @register("doc-reproduce", title="Doc", paper="-")
    ... def _demo(ctx):
    ...     return Outcome(pd.DataFrame({"a": [1]}), [Claim("a is 1", True, "a=1")], [])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     reports = reproduce(["doc-reproduce"], make_context(tmp, device="cpu"), echo=False)
    >>> reports[0].status, reports[0].claims_held
    ('ok', (1, 1))
    >>> unregister("doc-reproduce")
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from curvlab.experiments.harness.provenance import provenance
from curvlab.experiments.harness.registry import Context, Outcome, get_experiment, list_experiments

__all__ = [
    "ExperimentReport",
    "markdown_table",
    "reproduce",
    "resolve_names",
    "summary_markdown",
]


@dataclass
class ExperimentReport:
    """Result of one experiment inside :func:`reproduce`.

    ``status`` is ``"ok"`` or ``"error"``; ``error`` holds the traceback of a failed experiment.
    """

    name: str
    title: str
    status: str
    wall_clock_s: float
    outcome: Outcome | None = None
    error: str = ""

    @property
    def claims_held(self) -> tuple[int, int]:
        """``(held, total)`` claims; ``(0, 0)`` without an outcome."""
        if self.outcome is None:
            return 0, 0
        return sum(c.holds for c in self.outcome.claims), len(self.outcome.claims)


def resolve_names(names: Iterable[str]) -> list[str]:
    """Expand experiment names (or module names such as ``autoencoder``) to registered names.

    No names = every registered experiment. Raises ``ValueError`` listing the known names.

    Example:
        >>> resolve_names([]) == [e.name for e in list_experiments()]
        True
    """
    registered = list_experiments()
    names = list(names)
    if not names:
        return [e.name for e in registered]
    by_module: dict[str, list[str]] = {}
    for exp in registered:
        by_module.setdefault(exp.module.rsplit(".", 1)[-1], []).append(exp.name)
    out: list[str] = []
    for name in names:
        if any(e.name == name for e in registered):
            matched = [name]
        elif name in by_module:
            matched = by_module[name]
        else:
            known = ", ".join(e.name for e in registered) or "(none registered)"
            raise ValueError(f"unknown experiment {name!r}; known experiments: {known}")
        out.extend(m for m in matched if m not in out)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, *, digits: int = 4) -> str:
    """A pipe table of ``frame`` (floats with ``digits`` significant digits; NaN as ``—``).

    Example:
        >>> print(markdown_table(pd.DataFrame({"a": [1.23456, float("nan")], "b": ["x", "y"]})))
        | a | b |
        |---|---|
        | 1.235 | x |
        | — | y |
    """
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if v != v else f"{v:.{digits}g}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _key_numbers(outcome: Outcome) -> str:
    if outcome.key_numbers:
        return "; ".join(f"{k}={_fmt(v)}" for k, v in outcome.key_numbers.items())
    return ""


def summary_markdown(
    reports: Sequence[ExperimentReport], unavailable: Mapping[str, str] | None = None
) -> str:
    """Markdown summary: a table (experiment, status, claims held/total, key numbers, wall-clock),
    then every claim with its verdict, then unavailable modules and errors.

    Example:
        >>> print(summary_markdown([ExperimentReport("x", "X", "error", 1.0, error="boom")]))
        ... # doctest: +ELLIPSIS
        # curvlab reproduce summary
        ...
        | x | X | error | 0/0 |  | 1.0 |
        ...
    """
    lines = ["# curvlab reproduce summary", ""]
    prov = provenance("cpu")
    lines.append(f"git `{prov['git_commit']}`, torch {prov['torch_version']}, {prov['timestamp']}")
    lines += ["", "| experiment | title | status | claims held | key numbers | wall-clock (s) |",
              "|---|---|---|---|---|---|"]
    for r in reports:
        held, total = r.claims_held
        numbers = _key_numbers(r.outcome) if r.outcome is not None else ""
        lines.append(f"| {r.name} | {r.title} | {r.status} | {held}/{total} | {numbers} | "
                     f"{r.wall_clock_s:.1f} |")
    for module, reason in (unavailable or {}).items():
        lines.append(f"| ({module}) | — | not available: {reason} | — |  | — |")
    claim_lines = []
    for r in reports:
        if r.outcome is None:
            continue
        for c in r.outcome.claims:
            mark = "holds" if c.holds else "DOES NOT HOLD"
            claim_lines.append(f"- **{r.name}** — {c.name}: {mark} ({c.detail})")
        if r.outcome.notes:
            claim_lines.append(f"  - note ({r.name}): {r.outcome.notes}")
    if claim_lines:
        lines += ["", "## Claims", "", *claim_lines]
    errors = [r for r in reports if r.status == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            last = r.error.strip().splitlines()[-1] if r.error.strip() else "?"
            lines.append(f"- **{r.name}**: {last} (traceback in `{r.name}/error.txt`)")
    return "\n".join(lines) + "\n"


def _write_outcome(ctx: Context, report: ExperimentReport) -> None:
    exp_dir = ctx.experiment_dir(report.name)
    prov = provenance(ctx.device)
    if report.outcome is not None:
        outcome = report.outcome
        outcome.table.to_csv(exp_dir / "table.csv", index=False)
        claims = pd.DataFrame(
            [{"experiment": report.name, "claim": c.name, "holds": c.holds, "detail": c.detail,
              **prov} for c in outcome.claims],
            columns=["experiment", "claim", "holds", "detail", *prov],
        )
        claims.to_csv(exp_dir / "claims.csv", index=False)
        meta = {
            "name": report.name, "title": report.title, "status": report.status,
            "wall_clock_s": report.wall_clock_s, "full": ctx.full, "seeds": ctx.seeds,
            "notes": outcome.notes, "key_numbers": {k: _fmt(v) for k, v in
                                                    outcome.key_numbers.items()},
            "figures": [str(Path(f)) for f in outcome.figures], **prov,
        }
        (exp_dir / "outcome.json").write_text(json.dumps(meta, indent=2))
    if report.error:
        (exp_dir / "error.txt").write_text(report.error)


def reproduce(
    names: Iterable[str],
    ctx: Context,
    *,
    unavailable: Mapping[str, str] | None = None,
    echo: bool = True,
) -> list[ExperimentReport]:
    """Run the named experiments (all registered if ``names`` is empty) under ``ctx``.

    Writes per-experiment files and ``ctx.out_dir / "summary.md"`` (rewritten after every
    experiment); prints progress lines and the final summary when ``echo``.
    ``unavailable`` ({module: reason}) is listed in the summary as "not available".
    """
    selected = resolve_names(names)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    reports: list[ExperimentReport] = []
    for name in selected:
        exp = get_experiment(name)
        if echo:
            print(f"== {name}: {exp.title} [{'full' if ctx.full else 'quick'}, {ctx.device}]",
                  flush=True)
        start = time.perf_counter()
        try:
            outcome = exp(ctx)
            report = ExperimentReport(name, exp.title, "ok", time.perf_counter() - start, outcome)
        except Exception:  # one failing experiment must not stop the others
            report = ExperimentReport(name, exp.title, "error", time.perf_counter() - start,
                                      error=traceback.format_exc())
            if echo:
                print(report.error, flush=True)
        reports.append(report)
        _write_outcome(ctx, report)
        (ctx.out_dir / "summary.md").write_text(summary_markdown(reports, unavailable))
        if echo:
            held, total = report.claims_held
            print(f"   {report.status}: {held}/{total} claims hold, {report.wall_clock_s:.1f} s",
                  flush=True)
    text = summary_markdown(reports, unavailable)
    (ctx.out_dir / "summary.md").write_text(text)
    if echo:
        print(text, flush=True)
    return reports
