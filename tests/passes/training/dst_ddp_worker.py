"""Worker for test_dst_ddp.py: 2 gloo processes train every DST method under DDP and check mask equality.

Run as ``python dst_ddp_worker.py OUT.json`` (ranks are forked before any computation); rank 0 writes the
per-method results to OUT.json.
Each rank draws different data, and DDP runs with ``broadcast_buffers=False`` so that the masks (buffers)
are *not* synchronised by DDP itself: equality must come from sparsifx's own decisions and broadcasts.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

METHODS = {
    "rigl": {"sparsity": 0.9, "delta_t": 2, "end_step": 14},
    "set": {"epsilon": 10, "grow_init": "normal"},
    "sparse_momentum": {"sparsity": 0.9},
    "ctre": {"epsilon": 10},
    "gmp": {"sparsity": 0.9, "frequency": 2, "end_step": 12},
    "static": {"sparsity": 0.9},
    "rigl@sparse": {"sparsity": 0.9, "delta_t": 2, "end_step": 14, "storage": "sparse"},
    "set@sparse": {"epsilon": 10, "grow_init": "normal", "storage": "sparse"},
    "static@sparse": {"sparsity": 0.9, "storage": "sparse"},
}
STEPS_PER_EPOCH, EPOCHS = 4, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weight_of(module) -> torch.Tensor:
    return (module.values if hasattr(module, "values") else module.weight).detach()


def topology_of(module) -> tuple:
    if hasattr(module, "values"):  # sparse storage: the indices are the topology
        return module.crow, module.col, module.t_perm
    return (module.mask,)


def masks_equal(ctrl) -> bool:
    for module in ctrl.layers.values():
        for t in (*topology_of(module), weight_of(module)):
            gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, t.contiguous())
            if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
                return False
    return True


def train_one(method: str, params: dict, rank: int) -> dict:
    import sparsifx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    gm = sparsifx.sparsify(net, {"stages": [{"pass": method.split("@")[0], **params}]})
    model = nn.parallel.DistributedDataParallel(gm, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = sparsifx.attach(model, opt, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS)
    w0 = {n: weight_of(m).clone() for n, m in ctrl.layers.items()}
    gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    losses, checks = [], []
    for _ in range(STEPS_PER_EPOCH * EPOCHS):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        checks.append(masks_equal(ctrl))
    return {
        "losses": losses,
        "equal": checks,
        "updates": len({(h["step"], h["kind"]) for h in ctrl.history}),
        "changed": sum(h["grown"] + h["dropped"] for h in ctrl.history),
        "weights_moved": all(not torch.equal(w0[n], weight_of(m)) for n, m in ctrl.layers.items()),
    }


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {m: train_one(m, p, rank) for m, p in METHODS.items()}
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(results, fh)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import sparsifx  # noqa: F401  (imported once here; the forked ranks inherit it, no per-rank start-up)

    mp.start_processes(run, args=(2, free_port(), sys.argv[1]), nprocs=2, join=True, start_method="fork")
