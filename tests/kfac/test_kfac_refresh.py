"""Refresh policies (SP-NGD's adaptive stale statistics, THOR's trace rule and frequency)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab
from curvlab.kfac import AdaptiveRefresh, FixedRefresh, FrequencyRefresh, TraceRefresh
from curvlab.optim import KFACOptimizer


def _problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    return net, data


def _train(policy, steps=12, **kw):
    net, data = _problem()
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1, refresh=policy,
                        generator=torch.Generator().manual_seed(0), **kw)
    for k in range(steps):
        opt.step(*data[k % len(data)])
    return net, opt


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"max_interval": 0}, "max_interval"),
    ({"grow": "triple"}, "grow"), ({"shrink": "zero"}, "shrink"),
])
def test_adaptive_refresh_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        AdaptiveRefresh(**kwargs)


def test_other_policies_reject_bad_arguments():
    for make, arg in ((lambda: TraceRefresh(omega=0), "omega"),
                      (lambda: FrequencyRefresh(frequency=0), "frequency"),
                      (lambda: FixedRefresh(cov_interval=0), "cov_interval")):
        with pytest.raises(ValueError, match=arg):
            make()


def test_default_policy_is_fixed_and_matches_the_intervals():
    _, opt = _train(None, steps=10, cov_interval=2, inv_interval=4)
    assert isinstance(opt.refresh_policy, FixedRefresh)
    assert opt.counters["factor_updates"] == 5
    # inverses on steps 0, 1, 2 (forced) and 4, 8 (interval), when factors changed since
    assert opt.counters["inverse_updates"] == 4  # step 1 has no new factors
    assert {r["what"] for r in opt.refresh_log} == {"A", "G", "inverse"}


def test_adaptive_refresh_skips_statistics_and_sampled_backward():
    _, every = _train(FixedRefresh(1, 1, 0), steps=20)
    net, opt = _train(AdaptiveRefresh(alpha=1.0, grow="double", max_interval=8), steps=20)
    assert opt.counters["factor_updates"] < every.counters["factor_updates"] == 20
    counts = opt.refresh_policy.counts
    assert all(c["A"] < 20 and c["G"] < 20 for c in counts.values())
    # one sampled backward per step that needed a new G, none otherwise
    g_steps = {r["step"] for r in opt.refresh_log if r["what"] == "G"}
    assert opt.counters["backward"] == 20 + len(g_steps)
    assert opt.engine.layer_counters["0"]["factor_updates"] <= 20
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_adaptive_refresh_intervals_grow_when_similar_and_shrink_when_not():
    p = AdaptiveRefresh(alpha=0.1, grow="add1", shrink="halve", max_interval=3)
    p.bind(["fc"])
    eye = torch.eye(3)
    for _ in range(4):
        p.observe_update(0, "fc", "A", eye, eye)
    assert p.intervals["fc"]["A"] == 3  # capped
    p.observe_update(5, "fc", "A", eye, 2 * eye)
    assert p.intervals["fc"]["A"] == 1
    assert p.next_step["fc"]["A"] == 6


def test_trace_refresh_refreshes_inverses_only_on_trace_change():
    _, tiny = _train(TraceRefresh(omega=1e-12), steps=12)
    _, large = _train(TraceRefresh(omega=10.0), steps=12)
    assert tiny.counters["factor_updates"] == large.counters["factor_updates"] == 12
    per_layer = [c["inverse"] for c in large.refresh_policy.counts.values()]
    assert per_layer == [1, 1]  # only the first refresh: traces never change by 1000 %
    assert all(c["inverse"] == 12 for c in tiny.refresh_policy.counts.values())


def test_frequency_refresh_is_thors_schedule():
    _, opt = _train(FrequencyRefresh(frequency=4), steps=12)
    assert opt.counters["factor_updates"] == 3
    assert [r["step"] for r in opt.refresh_log if r["what"] == "inverse" and
            r["layer"] == "0"] == [0, 4, 8]


def test_policies_drive_the_preconditioner():
    net, data = _problem()
    loss_fn = nn.CrossEntropyLoss()
    precond = curvlab.KFACPreconditioner(net, loss_fn, damping=0.1,
                                         refresh=FrequencyRefresh(frequency=3))
    for k in range(6):
        net.zero_grad()
        loss_fn(net(data[k % 4][0]), data[k % 4][1]).backward()
        precond.step()
    assert precond.counters["factor_updates"] == 2
    assert precond.counters["inverse_updates"] == 2


def test_policy_state_round_trip_and_layer_check():
    net, opt = _train(AdaptiveRefresh(alpha=0.5), steps=6)
    state = copy.deepcopy(opt.state_dict())
    net2, _ = _problem()
    net2.load_state_dict(net.state_dict())
    opt2 = KFACOptimizer(net2, nn.CrossEntropyLoss(), lr=0.1, damping=0.1,
                         refresh=AdaptiveRefresh(alpha=0.5))
    opt2.load_state_dict(state)
    assert opt2.refresh_policy.intervals == opt.refresh_policy.intervals
    assert opt2.refresh_log == opt.refresh_log
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    policy = AdaptiveRefresh(alpha=0.5)
    policy.bind(["0", "2", "4"])
    with pytest.raises(ValueError, match=r"missing: \['4'\]"):
        policy.load_state_dict(state["curvlab"]["engine"]["policy"])
    del other
    with pytest.raises(ValueError, match="TraceRefresh"):
        TraceRefresh().load_state_dict(state["curvlab"]["engine"]["policy"])


def test_adaptive_refresh_with_unitwise_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = KFACOptimizer(net, nn.CrossEntropyLoss(), lr=0.1, damping=0.1,
                        refresh=AdaptiveRefresh(alpha=1.0))
    for _ in range(6):
        opt.step(x, y)
    assert opt.refresh_policy.counts["1"]["F"] >= 1
    assert "F" in opt.refresh_policy.similarity["1"]
