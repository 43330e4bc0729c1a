"""Prepared models under DistributedDataParallel, for every scheme (torch.compile: tests/test_torch_compile.py)."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxquant
from fxquant.quantizers import available_quantizers

SCHEMES = ["dsq", "lcq", "lsq", "qn", "ste"]


class SmallNet(nn.Module):
    """conv-bn-relu, conv-relu, linear: enough for weight and activation quantizers of every kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class ConvLinear(nn.Module):
    """The smallest net with a signed-input conv, an unsigned-input linear and no batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _prepared(scheme: str, net: type[nn.Module] = SmallNet, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6)
    cfg = fxquant.QuantConfig(quantizer=scheme, weight_bits=3, act_bits=3, first_last_bits=None)
    return fxquant.prepare(net(), (x,), cfg).train(), x


def test_the_schemes_are_registered():
    assert set(SCHEMES) <= set(available_quantizers())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = {}
        for scheme in SCHEMES:
            model, _ = _prepared(scheme)  # same initial model on every rank (batch norms folded during QAT)
            start = [p.detach().clone() for p in model.parameters()]
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            for step in range(2):
                fxquant.update_schedules(model, step / 1)
                x = torch.randn(4, 3, 6, 6, generator=gen)
                loss = ddp(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            moved = sum(int(not torch.equal(a, p.detach())) for a, p in zip(start, model.parameters(), strict=True))
            report[scheme] = (all(torch.equal(gathered[0], g) for g in gathered), moved, len(start))
        torch.save(report, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_keeps_ranks_in_sync():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        reports = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for report in reports:
        assert sorted(report) == SCHEMES
        for scheme, (in_sync, moved, total) in report.items():
            assert in_sync, f"{scheme}: parameters differ across ranks"
            assert moved >= total // 2, f"{scheme}: only {moved}/{total} parameters changed"
