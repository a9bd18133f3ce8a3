"""Runner: key stability, resume/skip, CSV append, provenance columns, Ctrl-C safety."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from curvlab.experiments.harness.provenance import PROVENANCE_COLUMNS, git_commit, resolve_device
from curvlab.experiments.harness.runner import Run, RunResult, flatten_config, read_results, run_all


def _fn(calls: list):
    def fn(run: Run) -> RunResult:
        calls.append(run.key)
        lr = run.config["lr"]
        trace = [{"iteration": i, "loss": lr * (i + 1)} for i in range(3)]
        return RunResult({"final_loss": lr * 3, "solved": lr < 1}, trace)

    return fn


def test_key_is_stable_and_order_independent():
    a = Run("exp", {"lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}}, seed=3)
    b = Run("exp", {"opt": {"momentum": 0.9, "name": "sgd"}, "lr": 0.1}, seed=3)
    assert a.key == b.key
    assert len(a.key) == 16 and int(a.key, 16) >= 0
    # a fixed value guards against accidental changes of the hashing scheme (breaks resume)
    assert Run("exp", {"lr": 0.1}, seed=0).key == Run("exp", {"lr": 0.1}, seed=0).key
    assert Run("exp", {"lr": 0.1}, seed=0).key != Run("exp", {"lr": 0.2}, seed=0).key
    assert Run("exp", {"lr": 0.1}, seed=0).key != Run("exp2", {"lr": 0.1}, seed=0).key
    assert hash(a) == hash(b) and a == b


def test_key_fixed_value():
    # computed once; if this changes, existing results directories would silently be re-run
    import hashlib
    import json

    payload = json.dumps({"experiment": "e", "config": {"a": 1}, "seed": 0}, sort_keys=True,
                         separators=(",", ":"))
    assert Run("e", {"a": 1}, 0).key == hashlib.sha256(payload.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"experiment": "", "config": {}}, ValueError),
        ({"experiment": "a/b", "config": {}}, ValueError),
        ({"experiment": "e", "config": [1, 2]}, TypeError),
        ({"experiment": "e", "config": {"f": object()}}, TypeError),
        ({"experiment": "e", "config": {}, "seed": 1.5}, TypeError),
        ({"experiment": "e", "config": {"seed": 1}}, ValueError),
    ],
)
def test_run_rejects_bad_input(kwargs, error):
    with pytest.raises(error, match="Run"):
        Run(**kwargs)


def test_flatten_config():
    assert flatten_config({"a": {"b": 1, "c": {"d": 2}}, "e": (1, 2)}) == {
        "a.b": 1, "a.c.d": 2, "e": "[1, 2]"
    }


def test_run_all_writes_rows_and_resumes(tmp_path):
    calls: list = []
    runs = [Run("exp", {"lr": lr, "opt": {"name": "sgd"}}, seed=s) for lr in (0.5, 2.0)
            for s in (0, 1)]
    summary, trace = run_all(runs, _fn(calls), tmp_path, progress=False)
    assert len(calls) == 4
    assert summary["key"].tolist() == [r.key for r in runs]
    assert {"key", "experiment", "seed", "lr", "opt.name", "final_loss", "solved",
            "wall_clock_s", *PROVENANCE_COLUMNS} <= set(summary.columns)
    assert summary["torch_version"].iloc[0] == torch.__version__
    assert summary["git_commit"].iloc[0] == git_commit()
    assert summary["device"].iloc[0] == "cpu"
    assert (summary["wall_clock_s"] >= 0).all()
    assert len(trace) == 12 and {"key", "seed", "lr", "iteration", "loss"} <= set(trace.columns)

    # resume: nothing to do; adding one run computes only that one
    calls.clear()
    more = [*runs, Run("exp", {"lr": 0.1, "opt": {"name": "sgd"}}, seed=0)]
    summary2, trace2 = run_all(more, _fn(calls), tmp_path, progress=False)
    assert calls == [more[-1].key]
    assert len(summary2) == 5 and len(trace2) == 15
    on_disk = pd.read_csv(tmp_path / "exp" / "summary.csv")
    assert len(on_disk) == 5  # appended, not duplicated


def test_run_all_restricts_to_requested_runs_and_dedups(tmp_path):
    calls: list = []
    a, b = Run("exp", {"lr": 0.5}, 0), Run("exp", {"lr": 1.5}, 0)
    run_all([a, b], _fn(calls), tmp_path, progress=False)
    summary, trace = run_all([b, b], _fn(calls), tmp_path, progress=False)
    assert len(calls) == 2
    assert summary["key"].tolist() == [b.key]
    assert set(trace["key"]) == {b.key}


def test_new_columns_rewrite_csv(tmp_path):
    def fn(run: Run) -> RunResult:
        extra = {"extra": 1.0} if run.config["i"] == 1 else {}
        return RunResult({"loss": float(run.config["i"]), **extra})

    runs = [Run("exp", {"i": i}, 0) for i in range(3)]
    summary, trace = run_all(runs, fn, tmp_path, progress=False)
    assert summary["loss"].tolist() == [0.0, 1.0, 2.0]
    assert summary["extra"].isna().tolist() == [True, False, True]
    assert trace.empty


def test_keyboard_interrupt_keeps_finished_runs(tmp_path):
    calls: list = []

    def fn(run: Run) -> RunResult:
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fn(calls)(run)

    runs = [Run("exp", {"lr": float(i)}, 0) for i in range(1, 5)]
    with pytest.raises(KeyboardInterrupt):
        run_all(runs, fn, tmp_path, progress=False)
    summary, trace = read_results(tmp_path, "exp")
    assert summary["key"].tolist() == [runs[0].key, runs[1].key]
    assert len(trace) == 6
    calls.clear()
    summary, _ = run_all(runs, _fn(calls), tmp_path, progress=False)
    assert calls == [runs[2].key, runs[3].key]
    assert summary["key"].tolist() == [r.key for r in runs]


def test_interrupted_trace_rows_are_dropped(tmp_path):
    run = Run("exp", {"lr": 1.0}, 0)
    (tmp_path / "exp").mkdir()
    pd.DataFrame([{"key": run.key, "seed": 0, "lr": 1.0, "iteration": 0, "loss": 9.0}]).to_csv(
        tmp_path / "exp" / "trace.csv", index=False)
    assert read_results(tmp_path, "exp")[1].empty  # no summary row -> not a finished run
    calls: list = []
    _, trace = run_all([run], _fn(calls), tmp_path, progress=False)
    assert len(trace) == 3 and 9.0 not in trace["loss"].tolist()


def test_exception_propagates_after_writing_earlier_rows(tmp_path):
    def fn(run: Run) -> RunResult:
        if run.config["i"] == 1:
            raise RuntimeError("diverged")
        return RunResult({"loss": 0.0})

    runs = [Run("exp", {"i": i}, 0) for i in range(3)]
    with pytest.raises(RuntimeError, match="diverged"):
        run_all(runs, fn, tmp_path, progress=False)
    assert read_results(tmp_path, "exp")[0]["i"].tolist() == [0]


def test_run_all_type_errors(tmp_path):
    with pytest.raises(TypeError, match="RunResult"):
        run_all([Run("exp", {}, 0)], lambda run: {"loss": 1}, tmp_path, progress=False)
    with pytest.raises(TypeError, match="sequence"):
        run_all(Run("exp", {}, 0), lambda run: RunResult({}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="clashes"):
        run_all([Run("exp", {"lr": 1}, 0)], lambda run: RunResult({"lr": 2}), tmp_path,
                progress=False)


def test_tensor_results_become_scalars(tmp_path):
    run = Run("exp", {}, 0)
    summary, _ = run_all([run], lambda r: RunResult({"loss": torch.tensor(0.25)}), tmp_path,
                         progress=False, device=torch.device("cpu"))
    assert summary["loss"].iloc[0] == 0.25


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-9000")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
