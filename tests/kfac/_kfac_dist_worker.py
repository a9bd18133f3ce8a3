"""Worker of tests/test_kfac_distributed.py: one gloo rank running every distributed scenario.

Spawned with ``torch.multiprocessing.spawn``; writes ``{out}/{tag}_{rank}.pt`` per scenario.
Shared with the test: :func:`make_net`, :func:`make_data`, :func:`build`, :func:`train`.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import gc
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from curvlab.kfac.refresh import AdaptiveRefresh, FixedRefresh
from curvlab.optim import KFACOptimizer
from curvlab.optim.preconditioner import KFACPreconditioner

STEPS, BATCH = 10, 8


def make_net(seed: int = 0, wide: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 6 if wide
                                                                               else 5),
                         nn.Tanh(), nn.Linear(6 if wide else 5, 3)).double()


def make_data(steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, BATCH, 1, 6, 6, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (steps, BATCH), generator=g)
    return xs, ys


def make_refresh(name: str | None):
    if name == "fixed2":
        return FixedRefresh(cov_interval=2, inv_interval=3, num_forced_inverses=1)
    if name == "adaptive":
        return AdaptiveRefresh(alpha=0.5, grow="add1", max_interval=3)
    return None


def build(kind: str, net: nn.Module, refresh: str | None = None, **dist_kw):
    loss_fn = nn.CrossEntropyLoss()
    if refresh is not None:
        dist_kw["refresh"] = make_refresh(refresh)
    if kind == "precond":
        pre = KFACPreconditioner(net, loss_fn, damping=0.1, fisher="empirical", inv_interval=3,
                                 **dist_kw)
        return pre, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return KFACOptimizer(net, loss_fn, lr=0.1, momentum=0.9, damping=0.1, fisher="type2",
                         inv_interval=3, **dist_kw), None


def train(kind: str, net, obj, sgd, xs, ys, start: int, stop: int, rank=0, world=1,
          ddp=None) -> None:
    loss_fn = nn.CrossEntropyLoss()
    per = BATCH // world
    for k in range(start, stop):
        x, y = xs[k, rank * per:(rank + 1) * per], ys[k, rank * per:(rank + 1) * per]
        if kind == "precond":
            sgd.zero_grad()
            loss_fn((ddp or net)(x), y).backward()
            obj.step()
            sgd.step()
        else:
            obj.step(x, y)


def flat(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


STALE = [("fixed2", {"distributed_mode": "sp-ngd", "refresh": "fixed2"}),
         ("adaptive", {"distributed_mode": "sp-ngd", "refresh": "adaptive"}),
         ("adaptive-mem", {"distributed_mode": "kaisa", "grad_worker_fraction": 0.5,
                           "refresh": "adaptive"})]


def scenarios(world: int):
    modes = [("comm-opt", {"distributed_mode": "kaisa", "grad_worker_fraction": 1.0}),
             ("mem-opt", {"distributed_mode": "kaisa", "grad_worker_fraction": 1.0 / world}),
             ("sp-ngd", {"distributed_mode": "sp-ngd"})]
    if world == 4:
        modes.insert(2, ("hybrid", {"distributed_mode": "kaisa", "grad_worker_fraction": 0.5}))
    else:
        modes += [("comm-opt-triu", {"distributed_mode": "kaisa",
                                     "distributed_options": {"symmetry_aware": True}}),
                  ("sp-ngd-emulated", {"distributed_mode": "sp-ngd",
                                       "distributed_options": {"emulate": True,
                                                               "symmetry_aware": True}})]
    return modes


def run_mode(kind, tag, kw, rank, world, out, xs, ys):
    net = make_net()
    ddp = None
    if kind == "precond" and kw["distributed_mode"] == "kaisa":
        ddp = nn.parallel.DistributedDataParallel(net)
    obj, sgd = build(kind, net, **kw)
    train(kind, net, obj, sgd, xs, ys, 0, STEPS, rank, world, ddp)
    torch.save({"params": flat(net), "comm": obj.comm_stats(),
                "assignment": obj.assignment.inverse_worker},
               f"{out}/{kind}_{tag}_{rank}.pt")


def run_resume(kind, kw, rank, world, out, xs, ys):
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net) if kind == "precond" and \
        kw["distributed_mode"] == "kaisa" else None
    obj, sgd = build(kind, net, **kw)
    train(kind, net, obj, sgd, xs, ys, 0, 5, rank, world, ddp)
    state = obj.state_dict()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    sgd_state = None if sgd is None else copy.deepcopy(sgd.state_dict())
    train(kind, net, obj, sgd, xs, ys, 5, STEPS, rank, world, ddp)
    straight = flat(net)
    net2 = make_net()
    net2.load_state_dict(weights)
    ddp2 = nn.parallel.DistributedDataParallel(net2) if ddp is not None else None
    obj2, sgd2 = build(kind, net2, **kw)
    obj2.load_state_dict(state)
    if sgd2 is not None:
        sgd2.load_state_dict(sgd_state)
    train(kind, net2, obj2, sgd2, xs, ys, 5, STEPS, rank, world, ddp2)
    torch.save({"straight": straight, "resumed": flat(net2), "state": state,
                "weights": weights}, f"{out}/resume_{kind}_{rank}.pt")


def run_nan(kind, kw, rank, world, out, xs, ys):
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net) if kind == "precond" and \
        kw["distributed_mode"] == "kaisa" else None
    obj, sgd = build(kind, net, **kw)
    xs = xs.clone()
    if rank == world - 1:
        xs[2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(kind, net, obj, sgd if kind == "optim" else _NanSafeSGD(sgd), xs, ys, 0, 4, rank,
              world, ddp)
    torch.save({"params": flat(net), "skipped": obj.counters["skipped_steps"],
                "warned": any("non-finite" in str(w.message) for w in caught)},
               f"{out}/nan_{kind}_{rank}.pt")


class _NanSafeSGD:
    """SGD that skips when the preconditioner skipped (its .grad still has NaN)."""

    def __init__(self, sgd):
        self.sgd = sgd

    def zero_grad(self):
        self.sgd.zero_grad()

    def step(self):
        ps = [p for g in self.sgd.param_groups for p in g["params"]]
        if all(torch.isfinite(p.grad).all() for p in ps if p.grad is not None):
            self.sgd.step()


def run_errors(rank, world, out):
    msgs = {}
    try:
        build("optim", make_net(wide=rank == 1), distributed_mode="kaisa")
    except ValueError as err:
        msgs["layers"] = str(err)
    if world == 4:
        try:
            build("optim", make_net(), grad_worker_fraction=0.75)
        except ValueError as err:
            msgs["fraction"] = str(err)
    torch.save(msgs, f"{out}/errors_{rank}.pt")


def main(rank: int, world: int, port: int, out: str, full: bool) -> None:
    # a crash (signal) dumps every thread's Python stack here; the test prints it on failure
    log = open(f"{out}/fault_{rank}.log", "w")  # open until the process ends
    faulthandler.enable(file=log, all_threads=True)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        xs, ys = make_data()
        for kind in ("precond", "optim"):
            for tag, kw in scenarios(world):
                run_mode(kind, tag, kw, rank, world, out, xs, ys)
        if full:
            for tag, kw in STALE:
                run_mode("precond", tag, kw, rank, world, out, xs, ys)
            run_resume("optim", {"distributed_mode": "kaisa", "grad_worker_fraction": 0.5},
                       rank, world, out, xs, ys)
            run_resume("precond", {"distributed_mode": "sp-ngd"}, rank, world, out, xs, ys)
            run_nan("optim", {"distributed_mode": "sp-ngd"}, rank, world, out, xs, ys)
            run_nan("precond", {"distributed_mode": "kaisa", "grad_worker_fraction": 0.5},
                    rank, world, out, xs, ys)
        run_errors(rank, world, out)
        # Collect our objects (hooks make model <-> preconditioner cycles holding gloo work and
        # tensors) while the interpreter is alive, and let every rank arrive before the group
        # goes: gloo objects left to interpreter teardown can abort the process
        # ("terminate called without an active exception"), seen here about once in 20 runs.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"done_{rank}").touch()  # every scenario ran and the group is gone


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
