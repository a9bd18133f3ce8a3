"""The CurvatureOptimizer contract for every curvlab optimizer: schedulers, state_dict resume,
NaN skip, deprecated names."""

import copy

import pytest
import torch
from torch import nn

from curvlab.optim import (
    CurveBall,
    DenseBFGS,
    DenseLevenbergMarquardt,
    HessianFree,
    KFACOptimizer,
    NaturalGradient,
    TorchOptimizer,
)
from curvlab.optim.ngd import dense_curvature

DT = torch.float64
CE = nn.CrossEntropyLoss()

MAKERS = {
    "curveball": lambda m: CurveBall(m, CE, lambda_interval=2, weight_decay=1e-3),
    "hessian_free": lambda m: HessianFree(m, CE, max_cg_iters=4),
    "ngd": lambda m: NaturalGradient(m, CE, lr=0.5, damping=1e-2, momentum=0.5),
    "kfac": lambda m: KFACOptimizer(m, CE, lr=0.1, damping=1e-2, inv_interval=2,
                                   generator=torch.Generator().manual_seed(0)),
    "sgd": lambda m: TorchOptimizer(m, CE, torch.optim.SGD, lr=0.1, momentum=0.9),
    "adam": lambda m: TorchOptimizer(m, CE, torch.optim.Adam, lr=0.01),
    "dense_lm": lambda m: DenseLevenbergMarquardt(m, CE),
    "dense_bfgs": lambda m: DenseBFGS(m, CE),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", ["curveball", "kfac", "hessian_free", "ngd"])
@pytest.mark.parametrize("sched", ["lambda", "step"])
def test_scheduler_equals_lr_set_by_hand(name, sched):
    factors = [1.0, 0.5, 0.5, 0.25, 0.25]
    ma, mb = _model(), _model()
    oa, ob = MAKERS[name](ma), MAKERS[name](mb)
    base = oa.param_groups[0]["lr"]
    if sched == "lambda":
        s = torch.optim.lr_scheduler.LambdaLR(oa, lambda k: factors[min(k, 4)])
    else:
        s = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.5)
        factors = [0.5**k for k in range(5)]
    for k, (x, y) in enumerate(_batches(5)):
        for g in ob.param_groups:
            g["lr"] = base * factors[k]
        oa.step(x, y)
        s.step()
        ob.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(_params(ma), _params(mb), strict=True))
    assert oa.param_groups[0]["lr"] != base  # the schedule did change it


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_resume_is_bit_exact(name):
    batches = _batches()
    ma, mb = _model(), _model()
    oa, ob = MAKERS[name](ma), MAKERS[name](mb)
    assert isinstance(oa, torch.optim.Optimizer)
    for x, y in batches:
        oa.step(x, y)
    for x, y in batches[:3]:
        ob.step(x, y)
    sd = ob.state_dict()
    assert {"state", "param_groups", "curvlab"} <= set(sd)
    mc = _model(5)
    mc.load_state_dict(copy.deepcopy(mb.state_dict()))
    torch.manual_seed(123)  # KFAC's own generator is restored from the state
    oc = MAKERS[name](mc)
    oc.load_state_dict(sd)
    for x, y in batches[3:]:
        oc.step(x, y)
    for a, c in zip(ma.state_dict().values(), mc.state_dict().values(), strict=True):
        assert torch.equal(a, c)
    assert oa.counters == oc.counters


@pytest.mark.parametrize("name", list(MAKERS))
def test_nan_batch_leaves_everything_untouched(name):
    m = _model()
    opt = MAKERS[name](m)
    (x, y), _ = _batches(2)
    opt.step(x, y)
    before_model = copy.deepcopy(m.state_dict())
    before = opt.state_dict()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad, y)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    after = opt.state_dict()
    assert after["curvlab"]["counters"]["skipped_steps"] == 1
    assert after["param_groups"] == before["param_groups"]
    for a, b in zip(after["state"].values(), before["state"].values(), strict=True):
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), (name, k)


def test_deprecated_names_warn_and_work():
    with pytest.warns(DeprecationWarning, match="'damping'"):
        cb = CurveBall(_model(), CE, lambd=0.3)
    assert cb.hyper("damping") == 0.3
    with pytest.warns(DeprecationWarning, match="damping"):
        assert cb.lambd == 0.3
    x, y = _batches(1)[0]
    cb.step(x, y)
    with pytest.warns(DeprecationWarning, match="steps"):
        assert cb.count == 1
    with pytest.warns(DeprecationWarning, match="velocity"):
        assert all(torch.equal(a, b) for a, b in zip(cb.z, cb.velocity, strict=True))
    with pytest.warns(DeprecationWarning, match="diagnostics"):
        assert cb.last is cb.diagnostics
    with pytest.warns(DeprecationWarning, match="'damping'"):
        hf = HessianFree(_model(), CE, lambd=0.7)
    with pytest.warns(DeprecationWarning):
        assert hf.lambd == 0.7
    with pytest.warns(DeprecationWarning, match="'damping'"):
        lm = DenseLevenbergMarquardt(_model(), CE, lambd=0.2)
    with pytest.warns(DeprecationWarning):
        assert lm.lambd == 0.2
    with pytest.warns(DeprecationWarning, match="'fisher'"):
        ngd = NaturalGradient(_model(), CE, curvature="empirical", momentum=0.5)
    assert ngd.fisher == "empirical"
    ngd.step(x, y)
    with pytest.warns(DeprecationWarning):
        assert ngd.count == 1 and len(ngd.buf) == 6
    m = _model()
    with pytest.warns(DeprecationWarning, match="'fisher'"):
        old = dense_curvature(m, CE, x, y, curvature="ggn")
    assert torch.equal(old, dense_curvature(m, CE, x, y, fisher="type2"))
    with pytest.raises(TypeError, match="damping"):
        CurveBall(_model(), CE, lambd=0.3, damping=0.3)
    with pytest.raises(TypeError, match="unexpected"):
        HessianFree(_model(), CE, lambda_=1.0)
