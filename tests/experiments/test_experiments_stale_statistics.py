"""Stale-statistics study (SP-NGD / THOR): a tiny-budget run of the study's functions, and the
pieces it is built from (refresh specs, fractions, realized intervals, split errors)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from curvlab.experiments import get_experiment, make_context
from curvlab.experiments.harness.threads import single_thread
from curvlab.experiments.studies import stale_statistics as st
from curvlab.experiments.studies.stale_tools import (
    EVERY_STEP,
    interval_grid,
    make_refresh,
    refresh_fractions,
    resnet18,
    split_errors,
    stale_cnn,
)
from curvlab.kfac import AdaptiveRefresh
from curvlab.optim import KFACOptimizer

TINY = {"iterations": 4, "eval_every": 2, "kfac": {"lr": [0.03], "damping": [0.1]},
        "sgd": [0.1], "adam": [1e-2], "alphas": [1.0], "split_dims": [128, None],
        "repeats": 1, "grad_examples": 64, "eval_train_size": 200}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    ctx = make_context(tmp_path_factory.mktemp("stale"), device="cpu")
    with single_thread():
        return st.run_stale_statistics(ctx, settings=TINY), ctx


def test_registered():
    assert get_experiment(st.NAME).fn is st.stale_statistics


def test_tiny_run_table_claims_files(outcome):
    out, ctx = outcome
    t = out.table.set_index("method")
    expected = {m for m, _, _ in st.refresh_methods({**st.stale_settings(), **TINY})}
    assert expected | {"SGD-momentum", "Adam", "K-FAC split 128"} == set(t.index)
    assert t.loc[st.EVERY, "factor_refresh_fraction"] == 1.0
    assert t.loc[st.EVERY, "inverse_refresh_fraction"] == 1.0
    assert t.loc["THOR (frequency 10)", "inverse_refresh_fraction"] == 0.25  # step 0 of 4
    assert t.loc["THOR (frequency 10)", "factor_refresh_fraction"] == 0.25
    assert t.loc["K-FAC split 128", "inverses_bytes"] < t.loc[st.EVERY, "inverses_bytes"]
    assert (t["iterations"] == 4).all()
    assert all(isinstance(c.holds, bool) for c in out.claims) and len(out.claims) >= 10
    assert all(p.exists() for p in out.figures) and len(out.figures) == 3
    exp = ctx.out_dir / st.NAME
    split = pd.read_csv(exp / "split.csv")
    assert split["split_dim"].astype(str).tolist() == ["128", "none"]
    assert split["rel_error"].iloc[-1] == 0.0 and 0.0 < split["rel_error"].iloc[0] < 1.0
    assert {"git_commit", "torch_version"} <= set(split.columns)
    logs = pd.read_csv(exp / "refresh_log.csv")
    assert {"step", "layer", "what", "interval", "method", "git_commit"} <= set(logs.columns)
    assert "not run" in out.notes


def test_resumed_run_computes_nothing(outcome, monkeypatch):
    out, ctx = outcome
    monkeypatch.setattr(st, "train", lambda *a, **k: pytest.fail("re-ran a finished run"))
    again = st.run_stale_statistics(ctx, settings=TINY)
    pd.testing.assert_frame_equal(again.table, out.table)


def test_make_refresh_specs():
    assert make_refresh(EVERY_STEP).inv_interval == 1
    p = make_refresh({"policy": "adaptive", "alpha": 0.5, "grow": "double"})
    assert isinstance(p, AdaptiveRefresh) and p.alpha == 0.5
    assert make_refresh({"policy": "frequency", "frequency": 3}).frequency == 3
    with pytest.raises(ValueError, match="policy must be one of"):
        make_refresh({"policy": "nope"})


def test_interval_grid_and_fractions_on_a_real_run():
    torch.manual_seed(0)
    net = stale_cnn(generator=torch.Generator().manual_seed(0))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.01, damping=0.1,
                        refresh=make_refresh({"policy": "frequency", "frequency": 2}))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(5):
        opt.step(x, y)
    f = refresh_fractions(opt.refresh_policy, 5)
    assert f == {"factor_refresh_fraction": 0.6, "inverse_refresh_fraction": 0.6}  # 0, 2, 4
    grid = interval_grid(pd.DataFrame(opt.refresh_log), 5)
    assert grid.shape == (5, 5) and grid.iloc[0].tolist() == [2.0, 2.0, 2.0, 2.0, 1.0]
    assert math.isnan(refresh_fractions(make_refresh(EVERY_STEP), 5)["inverse_refresh_fraction"])


def test_adaptive_refresh_with_unitwise_batchnorm_runs():
    torch.manual_seed(0)
    net = stale_cnn(generator=torch.Generator().manual_seed(0))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.01, damping=0.1,
                        refresh=make_refresh({"policy": "adaptive", "alpha": 10.0}))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(4):
        opt.step(x, y)
    assert opt.refresh_policy.counts["1"]["F"] == 3  # steps 0, 1, 3 (interval doubles)


def test_split_errors_against_a_dense_oracle():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3)).double()
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, fisher="empirical",
                        refresh=make_refresh(EVERY_STEP))
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt.step(x, y)
    grads = {"0.weight": torch.randn(3, 6, dtype=torch.float64),
             "0.bias": torch.randn(3, dtype=torch.float64)}
    table = split_errors(opt.engine, grads, 0.1, [4, None], repeats=1)
    block = opt.engine.blocks["0"]
    A, G = block.A, block.G
    A4 = torch.block_diag(A[:4, :4], A[4:, 4:])  # A is 7x7 (bias column): blocks 4 + 3
    V = torch.cat([grads["0.weight"], grads["0.bias"][:, None]], dim=1)

    def apply(Am):
        F = torch.kron(G, Am) + 0.1 * torch.eye(21, dtype=torch.float64)
        return torch.linalg.solve(F, V.reshape(-1))

    ref, split = apply(A), apply(A4)
    expected = float((split - ref).norm() / ref.norm())
    assert table["rel_error"].tolist()[1] == 0.0
    assert table["rel_error"].tolist()[0] == pytest.approx(expected, rel=1e-8)


def test_resnet18_size():
    net = resnet18()
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
