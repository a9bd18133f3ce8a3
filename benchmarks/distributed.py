"""Distributed K-FAC step time per mode at 1, 2, 4 gloo ranks on the benchmark MLP (CPU).

Not a test. Each configuration spawns ``world`` processes (one thread each) that train the
784-1000-500-250-10 MLP (global batch 512, split over the ranks) with DDP +
``KFACPreconditioner`` + SGD, ``inv_interval=1`` (every step refreshes: the worst case); the
median step time after warm-up, its ratio to the 1-rank step, and rank 0's measured bytes per
step next to :func:`curvlab.kfac.distributed.step_cost` are printed as a markdown table.

    python benchmarks/distributed.py [--steps 8] [--worlds 1 2 4] [--smoke]

``--smoke``: a 64-64-10 MLP, 2 steps, worlds 1 2 (checks the script runs). On fewer cores than
ranks the ranks share cores: the table then measures overheads, not speed-ups.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvlab.kfac import find_layers
from curvlab.kfac.distributed import step_cost
from curvlab.optim.preconditioner import KFACPreconditioner
from curvlab.problems import benchmark_mlp

MODES = {"comm-opt": ("kaisa", 1.0), "mem-opt": ("kaisa", "1/W"), "sp-ngd": ("sp-ngd", None)}


def _net(smoke: bool) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    return benchmark_mlp(hidden=(64,), generator=g) if smoke else benchmark_mlp(generator=g)


def _worker(rank, world, port, mode, steps, smoke, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        _run(rank, world, mode, steps, smoke, out)
        gc.collect()  # free the hooked objects while Python is alive (see examples/ddp_kfac.py)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank, world, mode, steps, smoke, out) -> None:
    """One rank's timed K-FAC steps; rank 0 saves the times and the last step's bytes."""
    kind, frac = MODES[mode]
    frac = 1.0 / world if frac == "1/W" else frac
    net = _net(smoke)
    model = nn.parallel.DistributedDataParallel(net) if kind == "kaisa" else net
    loss_fn = nn.CrossEntropyLoss()
    pre = KFACPreconditioner(model, loss_fn, damping=0.1, inv_interval=1,
                             distributed=True, distributed_mode=kind,
                             grad_worker_fraction=frac if kind == "kaisa" else None)
    sgd = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    per = 512 // world
    times = []
    for _ in range(steps):
        x = torch.randn(512, 784, generator=g)[rank * per:(rank + 1) * per]
        y = torch.randint(0, 10, (512,), generator=g)[rank * per:(rank + 1) * per]
        dist.barrier()
        t = time.perf_counter()
        sgd.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()
        sgd.step()
        times.append(time.perf_counter() - t)
    if rank == 0:
        torch.save({"times": times, "comm": pre.comm_stats()["last_step"]}, out)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    steps, worlds = (2, [1, 2]) if args.smoke else (args.steps, args.worlds)
    layers = [(la.name, la.in_dim, la.out_dim) for la in find_layers(_net(args.smoke)).layers]
    print(f"CPU cores: {os.cpu_count()}; one thread per rank; gloo; global batch 512")
    print("| mode | ranks | median step (s) | ratio to 1 rank | bytes/step measured | model |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            base = None
            for world in worlds:
                out = f"{tmp}/{mode}_{world}.pt"
                mp.spawn(_worker, args=(world, _port(), mode, steps, args.smoke, out),
                         nprocs=world)
                res = torch.load(out, weights_only=False)
                med = statistics.median(res["times"][1:] or res["times"])
                base = base if base is not None else med
                kind, frac = MODES[mode]
                frac = 1.0 / world if frac == "1/W" else (frac or 1.0)
                model = step_cost(layers, world, kind, frac)[0]["comm"]
                measured = sum(v["bytes"] for v in res["comm"].values())
                predicted = sum(v["bytes"] for v in model.values())
                print(f"| {mode} | {world} | {med:.3f} | {med / base:.2f} | {measured} | "
                      f"{predicted} |", flush=True)


if __name__ == "__main__":
    main()
