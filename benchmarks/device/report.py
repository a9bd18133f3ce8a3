"""What the device suite leaves under ``--out`` (at most 8 files; here 4):

* ``summary.json``: configuration, environment, and per part ``status``, ``seconds`` and result;
* ``summary.md``: the same as tables (also ``RESULTS/summary.md`` inside the archive);
* ``results.tar.gz``: the results folder (experiments' CSVs, figures, outcome files; benchmark
  CSVs under ``benchmarks/``), trace CSVs left out, largest first, if it would exceed 15 MiB;
* ``suite.log``: everything printed, child processes' output and tracebacks.
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from typing import Any

__all__ = ["MAX_ARCHIVE_BYTES", "pack_results", "summary_markdown", "write_json"]

MAX_ARCHIVE_BYTES = 15 * 2**20


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3g}"
    return str(v).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """Markdown of ``summary`` (the dict written to ``summary.json``)."""
    suite, env, parts = summary["suite"], summary.get("environment", {}), summary["parts"]
    lines = ["# curvlab device suite", "",
             f"mode {suite['mode']}, budget {suite['budget_s']} s, elapsed "
             f"{suite.get('elapsed_s', '?')} s, command `{suite['command']}`", ""]
    keys = ("gpu", "driver", "torch", "cuda_runtime", "cudnn", "device", "bf16_matmul_tflops",
            "copy_tb_per_s", "git_commit")
    lines += [", ".join(f"{k} {env[k]}" for k in keys if k in env), "",
              "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {_fmt(p['status'])} | {_fmt(p.get('seconds', ''))} |"
              for n, p in parts.items()]
    tests = parts.get("gpu-tests", {}).get("result", {})
    if tests.get("summary"):
        lines += ["", f"GPU tests: {tests['summary']}"]
    prod = parts.get("products", {}).get("result", {})
    if prod.get("rows"):
        lines += ["", "## Curvature products (median ms, ratio to one gradient)", ""]
        lines += _table(prod["rows"], ["model", "dtype", "product", "ms", "ratio_to_gradient",
                                       "error"])
    opt = parts.get("optimizers", {}).get("result", {})
    if opt.get("rows"):
        lines += ["", "## Optimizer steps (median ms, ratio to SGD; memory fp32)", ""]
        lines += _table(opt["rows"], ["model", "dtype", "optimizer", "ms", "ratio_to_sgd",
                                      "memory_mib", "memory_ratio", "error"])
    if opt.get("kfac_table"):
        lines += ["", "## K-FAC amortized step / SGD step (fp32)", "", opt["kfac_table"]]
    for part in ("products", "optimizers"):
        units = parts.get(part, {}).get("result", {}).get("units", {})
        if units:
            lines += ["", f"{part} units: " + "; ".join(f"{k}: {v}" for k, v in units.items())]
    exps = parts.get("experiments", {}).get("result", {}).get("experiments", {})
    if exps:
        lines += ["", "## Experiments (`python -m curvlab reproduce NAME`)", ""]
        rows = [{"experiment": n, **e} for n, e in exps.items()]
        lines += _table(rows, ["experiment", "status", "mode", "seeds", "budget_s", "seconds",
                               "finished_runs", "claims_held", "key_numbers"])
    for name, part in parts.items():
        if part.get("error"):
            lines += ["", f"**{name} error**: {part['error']} (traceback in suite.log)"]
    return "\n".join(lines) + "\n"


def write_json(summary: dict[str, Any], path: Path) -> None:
    """``summary`` as JSON (NaN written as null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, str | int | bool) or v is None or isinstance(v, float):
            return v
        return str(v)

    path.write_text(json.dumps(clean(summary), indent=2))


def pack_results(results: Path, archive: Path) -> list[str]:
    """``results`` as ``archive`` (top folder ``results/``); returns the files left out."""
    files = sorted(p for p in results.rglob("*") if p.is_file())
    left_out: list[str] = []
    traces = sorted((p for p in files if p.name == "trace.csv"), key=lambda p: -p.stat().st_size)
    while True:
        with tarfile.open(archive, "w:gz") as tar:
            for p in files:
                tar.add(p, arcname=str(Path("results") / p.relative_to(results)))
        if archive.stat().st_size <= MAX_ARCHIVE_BYTES or not traces:
            return left_out
        drop = traces.pop(0)
        files.remove(drop)
        left_out.append(str(drop.relative_to(results)))
