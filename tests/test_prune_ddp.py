"""Gates under DistributedDataParallel: two CPU processes (gloo) see different data, gates stay identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tg_kernels as tg

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        model, bank = tg.attach_gates(_model(), torch.randn(2, 3, 8, 8))
        ddp = nn.parallel.DistributedDataParallel(model)
        budget = tg.Budget(ddp, target=0.3, weight=5.0)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        torch.manual_seed(100 + rank)  # different data on every rank
        for _ in range(STEPS):
            x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
            loss = nn.functional.cross_entropy(ddp(x), y) + budget()
            opt.zero_grad()
            loss.backward()
            opt.step()
        gates = torch.cat([g.weight.detach() for g in bank.gates.values()])
        torch.save({"gates": gates, "open": bank.open_fraction()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_gates_stay_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["gates"], r1["gates"])
    assert not torch.all(r0["gates"] == 0.5), "gates did not train"
    assert r0["open"] == r1["open"]
