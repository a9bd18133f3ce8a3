"""GPU tests and full-size experiments of the device suite, each in a child process with a
deadline (a hung kernel or a sweep over its budget is stopped, the suite goes on).

* GPU tests: ``python -m pytest -m gpu tests`` (on a machine without CUDA: "skipped: no CUDA").
* Experiments: ``python -m curvlab reproduce NAME [--full] [--seeds N] --out RESULTS`` per
  :class:`~device.config.ExperimentPlan`, one after another into one results folder (the files of
  ``make reproduce``). An experiment stopped by its budget keeps the finished runs of its sweep
  (the runner is resumable: the same command with ``--results`` on that folder continues it).
  ``reproduce`` rewrites ``RESULTS/summary.md`` per call; each is moved to
  ``RESULTS/NAME/reproduce_summary.md`` and the suite writes the combined ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .budget import Log, run_child
from .config import SuiteConfig

__all__ = ["child_env", "experiments_part", "gpu_tests_part"]

_SUMMARY = re.compile(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b")


def child_env(repo: Path) -> dict[str, str]:
    """Environment of child processes: the repo root on ``PYTHONPATH``, Agg plots, no buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def gpu_tests_part(device: torch.device, timeout_s: float, log: Log, repo: Path
                   ) -> dict[str, Any]:
    """Run the CUDA-marked tests; status ``ok``/``failed``/``stopped: budget``/``skipped``."""
    if device.type != "cuda":
        return {"status": "skipped: no CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rfEs"]
    res = run_child(cmd, timeout_s=timeout_s, log=log, cwd=repo, env=child_env(repo))
    lines = [ln.strip("= ") for ln in res.tail.splitlines() if _SUMMARY.search(ln)]
    summary = lines[-1] if lines else "(no pytest summary line)"
    if res.timed_out:
        status = "stopped: budget"
    elif res.returncode in (0, 5):  # 5: no test collected
        status = "ok"
    else:
        status = f"failed (exit status {res.returncode})"
    return {"status": status, "summary": summary, "seconds": round(res.seconds, 1)}


def _registered(log: Log) -> tuple[list[str], dict[str, str]]:
    from curvlab.experiments import list_experiments, unavailable_modules

    names = [e.name for e in list_experiments()]
    return names, unavailable_modules()


def _count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(newline="", encoding="utf-8") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def _claims(path: Path) -> str:
    if not path.exists():
        return ""
    with path.open(newline="", encoding="utf-8") as f:
        holds = [row.get("holds") == "True" for row in csv.DictReader(f)]
    return f"{sum(holds)}/{len(holds)}"


def _run_one(plan: Any, slot: float, device: torch.device, results: Path, log: Log,
             repo: Path) -> dict[str, Any]:
    exp_dir = results / plan.name
    for stale in ("outcome.json", "error.txt", "reproduce_summary.md"):
        (exp_dir / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "curvlab", "reproduce", plan.name, "--out", str(results),
           "--device", device.type, "--no-progress"]
    if plan.full:
        cmd.append("--full")
    if plan.seeds is not None:
        cmd += ["--seeds", str(plan.seeds)]
    res = run_child(cmd, timeout_s=slot, log=log, cwd=repo, env=child_env(repo))
    if (results / "summary.md").exists():
        exp_dir.mkdir(parents=True, exist_ok=True)
        (results / "summary.md").replace(exp_dir / "reproduce_summary.md")
    entry: dict[str, Any] = {"mode": "full" if plan.full else "quick", "seeds": plan.seeds,
                             "budget_s": round(slot, 1), "seconds": round(res.seconds, 1),
                             "finished_runs": _count_rows(exp_dir / "summary.csv")}
    if (exp_dir / "outcome.json").exists():
        meta = json.loads((exp_dir / "outcome.json").read_text())
        entry.update(status="ok", claims_held=_claims(exp_dir / "claims.csv"),
                     key_numbers=meta.get("key_numbers", {}), notes=meta.get("notes", ""))
    elif res.timed_out:
        entry["status"] = "stopped: budget"
    elif (exp_dir / "error.txt").exists():
        last = (exp_dir / "error.txt").read_text().strip().splitlines() or ["?"]
        entry.update(status="error", error=last[-1][:300])
    else:
        entry.update(status=f"error (exit status {res.returncode})", error=res.tail[-300:])
    return entry


def experiments_part(cfg: SuiteConfig, device: torch.device, left: Callable[[], float],
                     log: Log, repo: Path, results: Path) -> dict[str, Any]:
    """Every planned experiment within its cap and the time left; the others get a status."""
    names, unavailable = _registered(log)
    out: dict[str, Any] = {"experiments": {}, "unavailable_modules": unavailable}
    table: dict[str, Any] = out["experiments"]
    results.mkdir(parents=True, exist_ok=True)
    for plan in cfg.experiments:
        slot = min(plan.cap_s, left())
        if plan.name not in names:
            table[plan.name] = {"status": "not run: not registered"}
        elif plan.needs and not os.environ.get("CURVLAB_DATA"):
            table[plan.name] = {"status": f"not run: needs downloaded data ({plan.needs} under "
                                          "CURVLAB_DATA, which is unset)"}
        elif slot < plan.min_s:
            table[plan.name] = {"status": "not run: budget", "left_s": round(left(), 1)}
        else:
            log(f"== experiment {plan.name} ({'full' if plan.full else 'quick'}, "
                f"budget {slot:.0f} s)")
            table[plan.name] = _run_one(plan, slot, device, results, log, repo)
            log(f"   {plan.name}: {table[plan.name]['status']}, "
                f"{table[plan.name]['seconds']} s")
    for name in names:
        table.setdefault(name, {"status": cfg.other_experiments})
    statuses = [e["status"] for e in table.values()]
    out["status"] = "ok" if all(s == "ok" or s.startswith("not run") or s.startswith("stopped")
                                for s in statuses) else "error"
    return out
