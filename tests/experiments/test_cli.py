"""``python -m curvlab``: argument parsing, list, and a tiny end-to-end reproduce."""

from __future__ import annotations

import pandas as pd
import pytest

from curvlab.__main__ import build_parser, main
from curvlab.experiments.harness.registry import Claim, Outcome, register, unregister
from curvlab.experiments.harness.runner import Run, RunResult, run_all


@pytest.fixture
def dummy_experiment():
    @register("test-dummy", title="Dummy sweep", paper="none")
    def dummy(ctx):
        runs = [Run("test-dummy", {"x": x}, seed=s) for x in (1, 2) for s in ctx.seed_list(1)]
        summary, _ = run_all(runs, lambda r: RunResult({"y": r.config["x"] ** 2},
                                                       [{"iteration": 0, "y": 0}]),
                             ctx.out_dir, progress=ctx.progress, device=ctx.device)
        fig = ctx.experiment_dir("test-dummy") / "fig.png"
        import matplotlib.figure

        f = matplotlib.figure.Figure()
        f.add_subplot().plot(summary["x"], summary["y"])
        f.savefig(fig)
        return Outcome(summary, [Claim("y grows", bool(summary["y"].is_monotonic_increasing),
                                       "y = x^2")], [fig], key_numbers={"max_y": 4})

    @register("test-raises", title="Raises", paper="none")
    def raises(ctx):
        raise RuntimeError("intentional failure")

    yield
    unregister("test-dummy")
    unregister("test-raises")


def test_parser_defaults_and_options():
    p = build_parser()
    a = p.parse_args(["reproduce"])
    assert (a.names, a.full, a.device, a.out, a.seeds, a.no_progress) == (
        [], False, "auto", "results", None, False)
    a = p.parse_args(["reproduce", "x", "y", "--full", "--device", "cpu", "--out", "o",
                      "--seeds", "3", "--no-progress"])
    assert (a.names, a.full, a.device, a.out, a.seeds, a.no_progress) == (
        ["x", "y"], True, "cpu", "o", 3, True)
    for bad in (["reproduce", "--seeds", "0"], ["reproduce", "--device", "tpu"], []):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_list(capsys, dummy_experiment):
    main(["list"])
    out = capsys.readouterr().out
    assert "test-dummy" in out and "Dummy sweep" in out


def test_unknown_name_lists_known(capsys, dummy_experiment):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "no-such-thing", "--device", "cpu"])
    assert info.value.code == 2
    assert "known experiments" in capsys.readouterr().err


def test_reproduce_end_to_end(tmp_path, capsys, dummy_experiment):
    code = main(["reproduce", "test-dummy", "--device", "cpu", "--out", str(tmp_path),
                 "--seeds", "2", "--no-progress"])
    assert code == 0
    summary = pd.read_csv(tmp_path / "test-dummy" / "summary.csv")
    assert len(summary) == 4 and {"git_commit", "torch_version", "device"} <= set(summary)
    assert (tmp_path / "test-dummy" / "fig.png").stat().st_size > 0
    md = (tmp_path / "summary.md").read_text()
    assert "| test-dummy | Dummy sweep | ok | 1/1 | max_y=4 |" in md
    assert "test-dummy" in capsys.readouterr().out
    # second call resumes (no new rows)
    assert main(["reproduce", "test-dummy", "--device", "cpu", "--out", str(tmp_path),
                 "--seeds", "2", "--no-progress"]) == 0
    assert len(pd.read_csv(tmp_path / "test-dummy" / "summary.csv")) == 4


def test_reproduce_nonzero_exit_when_an_experiment_raises(tmp_path, capsys, dummy_experiment):
    code = main(["reproduce", "test-raises", "test-dummy", "--device", "cpu", "--out",
                 str(tmp_path), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "intentional failure" in captured.out and "test-raises" in captured.err
    assert (tmp_path / "test-dummy" / "summary.csv").exists()  # the other one still ran


def test_reproduce_ctrl_c_returns_130_and_keeps_rows(tmp_path, capsys):
    calls = []

    @register("test-interrupt", title="Interrupted sweep", paper="none")
    def interrupted(ctx):
        def fn(run):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(run.key)
            return RunResult({"y": 1.0})

        run_all([Run("test-interrupt", {"i": i}, 0) for i in range(4)], fn, ctx.out_dir,
                progress=False)
        return Outcome(pd.DataFrame(), [], [])

    try:
        code = main(["reproduce", "test-interrupt", "--device", "cpu", "--out", str(tmp_path),
                     "--no-progress"])
    finally:
        unregister("test-interrupt")
    assert code == 130 and "resume" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "test-interrupt" / "summary.csv")) == 2
