"""Environment record and the benchmark parts of the device suite (not a test).

The benchmarks reuse ``benchmarks/products.py`` (``products``, ``measure``),
``benchmarks/optimizers.py`` (``CASES``, ``time_cases``, ``memory_case``) and
``benchmarks/kfac_step.py`` (``measure``, ``amortized``, ``table``) on the models of
:data:`device.config.BENCH_MODELS`, which :func:`register_models` adds to ``_common.MODELS``.
Timing is theirs: CUDA-synchronized wall clock, interleaved repetitions, medians. bf16 runs the
same code under ``torch.autocast(dtype=torch.bfloat16)`` (parameters stay float32).

Each part fills ``result`` (a dict) as it goes, so a part stopped by its budget keeps what it
measured; a unit (model x dtype) is not started with less than ``cfg.unit_min_s`` left.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import BENCH_MODELS, SuiteConfig

__all__ = ["environment", "optimizers_part", "products_part", "register_models"]

Left = Callable[[], float]


def register_models() -> None:
    """Add :data:`BENCH_MODELS` to ``benchmarks/_common.MODELS`` (the dict the scripts use)."""
    import _common

    _common.MODELS.update(BENCH_MODELS)


def _amp(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"device suite: dtype must be 'fp32' or 'bf16', got {dtype!r}")


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _nvidia_smi(log: Callable[..., None]) -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": "not found"}
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    try:
        query = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        full = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"nvidia_smi": f"failed: {err}"}
    log(full, echo=False)
    out = {"nvidia_smi": query}
    values = [v.strip() for v in query.splitlines()[0].split(",")] if query else []
    if len(values) >= 2:
        out["driver"] = values[1]
    return out


def _ceilings(device: torch.device) -> dict[str, float]:
    """bf16 8192^3 matrix product (TFLOP/s) and device-to-device copy (TB/s, read + write)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    out: dict[str, float] = {}
    for name, fn, work in (("bf16_matmul_tflops", lambda: a @ b, 2 * n**3 / 1e12),
                           ("copy_tb_per_s", lambda: dst.copy_(src), 2 * src.nbytes / 1e12)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        stop.record()
        torch.cuda.synchronize(device)
        out[name] = round(work / (start.elapsed_time(stop) / 10 / 1e3), 1)
    return out


def environment(device: torch.device, log: Callable[..., None]) -> dict[str, Any]:
    """Device, driver (nvidia-smi), torch, CUDA and cuDNN versions, and measured ceilings."""
    from curvlab.experiments.provenance import git_commit

    info: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(),
        "executable": sys.executable, "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda or "none", "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "git_commit": git_commit(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    info.update(_nvidia_smi(log))
    if device.type == "cuda":
        info.update(_ceilings(device))
        _free(device)
    return info


def _checked(fns: dict[str, Callable], device: torch.device, dtype: str
             ) -> tuple[dict[str, Callable], dict[str, str]]:
    """Each product wrapped in the dtype's autocast; those that raise once are left out."""
    ok: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        def wrapped(fn: Callable = fn) -> object:
            with _amp(device, dtype):
                return fn()
        try:
            wrapped()
            ok[name] = wrapped
        except Exception as err:  # recorded in the summary, the other products still run
            errors[name] = f"{type(err).__name__}: {err}"[:300]
    return ok, errors


def _batch(model_name: str, device: torch.device):
    import _common

    torch.manual_seed(0)
    model, shape, batch = _common.MODELS[model_name]()
    model = model.to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def products_part(cfg: SuiteConfig, device: torch.device, left: Left, result: dict[str, Any],
                  log: Callable[..., None]) -> None:
    """Curvature products / gradient (``products.measure``) per model and dtype."""
    import products

    rows: list[dict[str, Any]] = result.setdefault("rows", [])

    def unit(model_name: str, dtype: str) -> str:
        model, x, y = _batch(model_name, device)
        with _amp(device, dtype):
            fns = products.products(model, x, y)
        fns, errors = _checked(fns, device, dtype)
        med = products.measure(fns, cfg.product_repeats, device)
        grad = med.get("gradient", float("nan"))
        for name, t in med.items():
            rows.append({"model": model_name, "dtype": dtype, "product": name,
                         "ms": 1e3 * t, "ratio_to_gradient": t / grad})
        for name, err in errors.items():
            rows.append({"model": model_name, "dtype": dtype, "product": name,
                         "ms": float("nan"), "ratio_to_gradient": float("nan"),
                         "error": err})
        return f"gradient {1e3 * grad:.2f} ms, {len(errors)} failed"

    _units("products", cfg.product_units, unit, cfg, device, left, result, log)


def _units(part: str, pairs: tuple[tuple[str, str], ...], body: Callable[[str, str], str],
           cfg: SuiteConfig, device: torch.device, left: Left, result: dict[str, Any],
           log: Callable[..., None]) -> None:
    """``body(model, dtype)`` per pair, each recorded in ``result["units"]``; a unit that
    raises is recorded with its traceback (in the log) and the next one runs."""
    units: dict[str, str] = result.setdefault("units", {})
    for model_name, dtype in pairs:
        name = f"{model_name}/{dtype}"
        if left() < cfg.unit_min_s:
            units[name] = "not run: budget"
            continue
        units[name] = "running"
        start = time.monotonic()
        try:
            note = body(model_name, dtype)
            units[name] = f"ok ({time.monotonic() - start:.1f} s)"
            log(f"  {part} {name}: {note}, {time.monotonic() - start:.1f} s")
        except Exception as err:  # recorded; the next unit still runs
            units[name] = f"error: {type(err).__name__}: {err}"[:300]
            log(f"  {part} {name} failed:\n{traceback.format_exc()}")
        _free(device)


def _time_steps(model_name: str, device: torch.device, dtype: str, cfg: SuiteConfig
                ) -> tuple[dict[str, float], dict[str, str]]:
    """``optimizers.time_cases`` over every case; a case that fails alone is left out."""
    import optimizers

    cases = list(optimizers.CASES)
    errors: dict[str, str] = {}
    try:
        with _amp(device, dtype):
            return optimizers.time_cases(model_name, cases, device, cfg.step_repeats,
                                         cfg.steps_per_round), errors
    except Exception:
        _free(device)
    for case in list(cases):  # find the failing cases, one step each
        try:
            with _amp(device, dtype):
                optimizers.time_cases(model_name, [case], device, 1, 1)
        except Exception as err:
            errors[case.name] = f"{type(err).__name__}: {err}"[:300]
            cases.remove(case)
        _free(device)
    if not cases:
        return {}, errors
    with _amp(device, dtype):
        return optimizers.time_cases(model_name, cases, device, cfg.step_repeats,
                                     cfg.steps_per_round), errors


def optimizers_part(cfg: SuiteConfig, device: torch.device, left: Left, result: dict[str, Any],
                    log: Callable[..., None]) -> None:
    """Optimizer step / SGD step per model and dtype, step memory (fp32), K-FAC table (fp32)."""
    import kfac_step
    import optimizers

    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    kfac_rows: list[dict[str, Any]] = result.setdefault("kfac_rows", [])

    def unit(model_name: str, dtype: str) -> str:
        times, errors = _time_steps(model_name, device, dtype, cfg)
        base = times.get(optimizers.BASELINE, float("nan"))
        mem: dict[str, float] = {}
        if model_name in cfg.memory_models and dtype == "fp32":
            for case in optimizers.CASES:
                if case.name in times and left() > cfg.unit_min_s:
                    try:
                        mem[case.name] = optimizers.memory_case(model_name, case.name, device)
                    except Exception as err:
                        errors.setdefault(case.name, f"memory: {type(err).__name__}: {err}")
                    _free(device)
        mem_base = mem.get(optimizers.MEMORY_BASELINE, float("nan"))
        for name, t in times.items():
            rows.append({"model": model_name, "dtype": dtype, "optimizer": name,
                         "ms": 1e3 * t, "ratio_to_sgd": t / base,
                         "memory_mib": mem.get(name, float("nan")),
                         "memory_ratio": mem.get(name, float("nan")) / mem_base})
        for name, err in errors.items():
            rows.append({"model": model_name, "dtype": dtype, "optimizer": name,
                         "ms": float("nan"), "ratio_to_sgd": float("nan"), "error": err})
        return f"SGD {1e3 * base:.2f} ms, {len(errors)} failed"

    def kfac_unit(model_name: str, inverse: str) -> str:
        t = kfac_step.measure(model_name, repeats=cfg.kfac_repeats, device=device,
                              inverse=inverse)
        row = {"model": model_name, "inverse": inverse, **t}
        for cov, inv in kfac_step.CONFIGS:
            row[f"ratio_cov{cov}_inv{inv}"] = kfac_step.amortized(t, cov, inv) / t["sgd"]
        kfac_rows.append(row)
        result["kfac_table"] = kfac_step.table({(r["model"], r["inverse"]): r
                                                for r in kfac_rows})
        return f"K-FAC {inverse}: inverse refresh {1e3 * t['inv']:.1f} ms"

    _units("optimizers", cfg.step_units, unit, cfg, device, left, result, log)
    kfac_pairs = tuple((m, inv) for m in cfg.models for inv in cfg.kfac_inverses)
    _units("K-FAC", kfac_pairs, kfac_unit, cfg, device, left, result, log)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV with the union of their keys as columns (nothing written if empty)."""
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
