"""The one-command GPU suite (``benchmarks/device_suite.py``) runs end to end on the CPU.

``--smoke`` takes the whole path at tiny sizes (< 1 min on 2 idle cores): every part must be
named in ``summary.json`` with a status, and at most 8 files may be left under ``--out`` (what
the device machine sends back).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "device_suite.py"
PARTS = ("env", "gpu-tests", "products", "optimizers", "experiments")


def _run(out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), "--out", str(out), "--smoke",
                           "--work", str(out.parent / "work"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.json", "summary.md", "suite.log", "results.tar.gz"} <= set(files), files
    return json.loads((out / "summary.json").read_text())


def test_selected_parts_only(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--parts", "gpu-tests", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = _summary(out)["parts"]
    assert list(parts) == list(PARTS)
    assert parts["env"]["status"] == "ok"
    assert parts["env"]["result"]["torch"]
    if not parts["env"]["result"]["cuda_available"]:
        assert parts["gpu-tests"]["status"] == "skipped: no CUDA"
    for name in ("products", "optimizers", "experiments"):
        assert parts[name]["status"] == "not run: not selected"


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "out"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(out)
    parts = summary["parts"]
    assert list(parts) == list(PARTS)
    for name, part in parts.items():
        assert isinstance(part["status"], str) and part["status"], name
        assert not part["status"].startswith("error"), (name, part)
    assert summary["suite"]["mode"] == "smoke"
    # benchmarks measured something (the tiny MLP at least) in both dtypes
    rows = parts["products"]["result"]["rows"]
    assert {(r["dtype"], r["product"]) for r in rows} >= {("fp32", "gradient"),
                                                         ("bf16", "gradient")}
    assert any(r["optimizer"] == "SGD" for r in parts["optimizers"]["result"]["rows"])
    mlp = next(iter(parts["products"]["result"]["units"])).split("/")[0]
    for part in ("products", "optimizers"):  # the core path works (other units may fail)
        assert parts[part]["result"]["units"][f"{mlp}/fp32"].startswith("ok"), parts[part]
    # experiments: each registered one has a status; the budget path was taken
    exps = parts["experiments"]["result"]["experiments"]
    assert all(e["status"] for e in exps.values())
    assert exps["kfac-anatomy"]["status"] in ("ok", "stopped: budget")  # a loaded machine
    assert exps["curveball-toy"]["status"] == "stopped: budget"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/summary.md" in names
    if exps["kfac-anatomy"]["status"] == "ok":
        assert "results/kfac-anatomy/claims.csv" in names
    assert "results/benchmarks/products.csv" in names


def test_budget_too_small_records_not_run(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--parts", "experiments", "--budget-s", "8", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    part = _summary(out)["parts"]["experiments"]
    if part["status"] != "not run: budget":
        exps = part["result"]["experiments"]
        assert all(e["status"].startswith("not run") for e in exps.values()), exps


def test_full_configuration_names_are_known():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from device.config import BENCH_MODELS, suite_config
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from curvlab.experiments import list_experiments

    registered = {e.name for e in list_experiments()}
    for smoke in (True, False):
        cfg = suite_config(smoke)
        units = cfg.product_units + cfg.step_units
        assert {m for m, _ in units} | set(cfg.models) <= set(BENCH_MODELS)
        assert {d for _, d in units} <= {"fp32", "bf16"}
        assert {p.name for p in cfg.experiments} <= registered
        assert sum(cfg.part_caps.values()) > 0 and set(cfg.part_caps) == set(PARTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_full_sizes_refused_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use --smoke" in proc.stderr
