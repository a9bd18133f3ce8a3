"""One prepared GPU run: environment, CUDA tests, benchmarks at GPU sizes, full-size experiments.

    python benchmarks/device_suite.py --out DIR [--smoke] [--budget-s 540] [--parts ...]
                                      [--work DIR] [--results DIR]

On the lent H200 (bare, no network; its own ``python3`` with torch): ``python3
benchmarks/device_suite.py --out $OUT --budget-s 520`` (``papers/README_gpu.md``). Installs
nothing; when ``curvlab`` is not importable the repository root is put on ``sys.path`` (and on
the children's ``PYTHONPATH``). Parts, in order (``--parts`` picks some; ``env`` always runs):

* ``env``: device, driver (nvidia-smi), torch, CUDA, cuDNN; bf16 matmul and copy ceilings;
* ``gpu-tests``: ``pytest -m gpu tests`` (``skipped: no CUDA`` without a GPU);
* ``products``: ``benchmarks/products.py`` on the MLP (batch 4096) and a ResNet-18 (batch 256),
  fp32 and bf16 autocast; ``optimizers``: ``benchmarks/optimizers.py`` and ``kfac_step.py``;
* ``experiments``: ``python -m curvlab reproduce NAME --full`` for the experiments that need no
  downloaded data, each within its own budget (``device/config.py``).

Every part checks the time left of ``--budget-s`` (a part over its cap is stopped: in-process
parts by SIGALRM, child processes by a kill), a failing part is recorded with its traceback in
``suite.log``, and ``summary.json``, ``summary.md``, ``results.tar.gz`` and ``suite.log`` are
always written under ``--out``. ``--smoke``: the same path on the CPU at tiny sizes (< 1 min).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.monotonic()  # the budget counts from here: torch's import is part of the run

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if importlib.util.find_spec("curvlab") is None:
    sys.path.insert(0, str(REPO))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from device.bench import (  # noqa: E402
    environment,
    optimizers_part,
    products_part,
    register_models,
    write_csv,
)
from device.budget import AlarmState, BudgetExceeded, Clock, Log, alarm  # noqa: E402
from device.config import PARTS, suite_config  # noqa: E402
from device.experiments import experiments_part, gpu_tests_part  # noqa: E402
from device.report import pack_results, summary_markdown, write_json  # noqa: E402

SELECTABLE = PARTS[1:]
Left = Callable[[], float]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the suite."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the (at most 8) files")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 1 minute)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget (s)")
    p.add_argument("--parts", nargs="+", choices=SELECTABLE, default=list(SELECTABLE))
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (default: WORK/results; an existing one is resumed)")
    return p


def _run_part(name: str, fn: Any, seconds: float, log: Log) -> dict[str, Any]:
    """Run ``fn(result, left)`` under an alarm of ``seconds`` (``left()``: seconds left of them);
    returns the part's status, time and (partial) result."""
    result: dict[str, Any] = {}
    entry: dict[str, Any] = {"status": "running", "cap_s": round(seconds, 1), "result": result}
    start = time.monotonic()
    log(f"== {name} (up to {seconds:.0f} s)")

    def left() -> float:
        return seconds - (time.monotonic() - start)

    state = AlarmState()
    try:
        with alarm(seconds) as state:
            status = fn(result, left)
        entry["status"] = status or "ok"
    except BudgetExceeded:
        entry["status"] = "stopped: budget"
        log(f"   {name}: stopped by its budget")
    except Exception as err:  # recorded; the suite goes on with the next part
        if state.fired:  # the alarm's exception, re-raised as another type (TorchScript)
            entry["status"] = "stopped: budget"
            log(f"   {name}: stopped by its budget ({type(err).__name__})")
            entry["seconds"] = round(time.monotonic() - start, 1)
            return entry
        entry["status"] = "error"
        entry["error"] = f"{type(err).__name__}: {err}"[:500]
        log(f"   {name} failed:\n{traceback.format_exc()}")
    entry["seconds"] = round(time.monotonic() - start, 1)
    log(f"   {name}: {entry['status']} ({entry['seconds']} s)")
    return entry


def _units_status(result: dict[str, Any]) -> str:
    """``ok``, or ``partial: N of M units failed`` (each unit's error is in ``units``)."""
    units = result.get("units", {})
    failed = sum(str(v).startswith("error") for v in units.values())
    return f"partial: {failed} of {len(units)} units failed" if failed else "ok"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns 0 when no part ended in an error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full sizes are for the GPU machine; use --smoke here")
    cfg = suite_config(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)  # tiny sizes: one thread is faster and steadier on a shared CPU
    clock = Clock(args.budget_s, cfg.reserve_s, start=T0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="curvlab-device-"))
    work.mkdir(parents=True, exist_ok=True)
    results = args.results or work / "results"
    results.mkdir(parents=True, exist_ok=True)
    log = Log(out / "suite.log")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    command = "python benchmarks/device_suite.py " + shlex.join(argv or sys.argv[1:])
    summary: dict[str, Any] = {
        "suite": {"mode": cfg.mode, "budget_s": args.budget_s, "command": command,
                  "device": str(device), "parts_selected": args.parts,
                  "config": {k: v for k, v in vars(cfg).items() if k != "experiments"},
                  "experiment_plans": [vars(p) for p in cfg.experiments]},
        "parts": {},
    }
    parts: dict[str, Any] = summary["parts"]
    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        log(f"{filename}:{lineno}: {category.__name__}: {message}", echo=False)

    warnings.showwarning = show_warning  # into suite.log only: the console keeps the tables
    log(f"curvlab device suite: {cfg.mode}, device {device}, budget {args.budget_s:.0f} s, "
        f"out {out}, results {results}")

    def cap(name: str) -> float:
        return min(cfg.part_caps[name], clock.left())

    def env_fn(result: dict[str, Any], left: Left) -> None:
        result.update(environment(device, log))
        summary["environment"] = result
        log("   " + ", ".join(f"{k}={v}" for k, v in result.items() if k != "nvidia_smi"))

    def tests_fn(result: dict[str, Any], left: Left) -> str:
        result.update(gpu_tests_part(device, left() - 2, log, REPO))
        return result.pop("status")

    def products_fn(result: dict[str, Any], left: Left) -> str:
        try:
            products_part(cfg, device, left, result, log)
        finally:
            write_csv(result.get("rows", []), results / "benchmarks" / "products.csv")
        return _units_status(result)

    def optimizers_fn(result: dict[str, Any], left: Left) -> str:
        try:
            optimizers_part(cfg, device, left, result, log)
            return _units_status(result)
        finally:
            write_csv(result.get("rows", []), results / "benchmarks" / "optimizers.csv")
            write_csv(result.get("kfac_rows", []), results / "benchmarks" / "kfac_step.csv")

    def experiments_fn(result: dict[str, Any], left: Left) -> str:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result.update(experiments_part(cfg, device, lambda: left() - 3, log, REPO, results))
        return result.pop("status")

    fns = {"env": env_fn, "gpu-tests": tests_fn, "products": products_fn,
           "optimizers": optimizers_fn, "experiments": experiments_fn}
    try:
        register_models()
        for name in PARTS:
            if name != "env" and name not in args.parts:
                parts[name] = {"status": "not run: not selected"}
            elif cap(name) < 1.0:
                parts[name] = {"status": "not run: budget"}
            else:
                parts[name] = _run_part(name, fns[name], cap(name), log)
    finally:
        summary["suite"]["elapsed_s"] = round(clock.elapsed(), 1)
        text = summary_markdown(summary)
        (results / "summary.md").write_text(text)
        try:
            summary["suite"]["archive_left_out"] = pack_results(results, out / "results.tar.gz")
        except Exception:
            log(f"packing the results failed:\n{traceback.format_exc()}")
        summary["suite"]["elapsed_s"] = round(clock.elapsed(), 1)
        write_json(summary, out / "summary.json")
        (out / "summary.md").write_text(summary_markdown(summary))
        log(summary_markdown(summary))
        log.close()
    failed = [n for n, p in parts.items() if p["status"].startswith(("error", "failed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
