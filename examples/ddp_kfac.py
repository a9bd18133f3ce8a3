"""DDP + distributed K-FAC preconditioner + SGD on the bundled 8×8 digits (a small CNN).

Run (CPU, gloo)::

    torchrun --nproc_per_node=2 examples/ddp_kfac.py [--mode kaisa|sp-ngd] [--fraction 0.5]

The only K-FAC-specific lines are constructing :class:`curvlab.KFACPreconditioner` after
``init_process_group`` and calling ``precond.step()`` between ``backward`` and ``sgd.step``;
each rank trains on its own shard of every global batch (DDP averages the gradients, the
preconditioner averages the factors). On GPUs use ``--backend nccl``.
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch
import torch.distributed as dist
from torch import nn

from curvlab.data import load_digits
from curvlab.optim.preconditioner import KFACPreconditioner


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    """Train the CNN on this rank's shard of every global batch; rank 0 prints."""
    data = load_digits(flatten=False)
    # (N, 1, 8, 8) images with strides that also read as channels_last: give them the plain
    # layout, or the convolutions' weight gradients come out channels_last and DDP warns that
    # they do not match its buckets' strides
    x_train = data.x_train.clone(memory_format=torch.contiguous_format)
    torch.manual_seed(0)  # the same initial model on every rank
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    model = nn.parallel.DistributedDataParallel(net) if args.mode == "kaisa" else net
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(model, loss_fn, damping=0.1, inv_interval=10,
                                 distributed_mode=args.mode,
                                 grad_worker_fraction=args.fraction)
    sgd = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(1)  # the same global batches on every rank
    per = args.batch // world
    for step in range(args.steps):
        idx = torch.randint(0, data.num_train, (args.batch,), generator=g)
        mine = idx[rank * per:(rank + 1) * per]
        sgd.zero_grad()
        loss = loss_fn(model(x_train[mine]), data.y_train[mine])
        loss.backward()
        precond.step()
        sgd.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        acc = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    stats = precond.comm_stats()
    if rank == 0:
        print(f"world {world}, mode {args.mode}, assignment "
              f"{precond.assignment.inverse_worker}")
        print(f"test accuracy {acc:.3f}; bytes per step "
              f"{ {k: int(v['bytes']) for k, v in stats['per_step'].items()} }")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="kaisa", choices=["kaisa", "sp-ngd"])
    ap.add_argument("--fraction", type=float, default=None, help="KAISA grad_worker_fraction")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        train(args, rank, world)
        # Free the model, DDP and preconditioner (hooks make reference cycles) while Python is
        # alive, and let every rank arrive before the group goes: gloo work left to
        # interpreter teardown can abort the process at exit.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
