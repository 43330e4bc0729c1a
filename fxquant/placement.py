"""Where a training run executes: its device, its mixed precision and its torchrun process group.

``fxquant train``/``search`` run on one device per process. Under ``torchrun --nproc-per-node N`` every
process reads the same global batches (same seed, same shuffle) and keeps its share of each, every
``world_size``-th sample from its rank on, which is how :class:`torch.utils.data.DistributedSampler` splits
a shuffled order; position is counted in global batches, so a run resumes with any number of processes.
Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`; buffers (quantizer state,
batch-norm statistics) are broadcast from rank 0 after every step, so every rank holds the same model.
Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fxquant.errors import ConfigError

__all__ = [
    "AMP_DTYPES", "DEVICE_CHOICES", "Placement", "autocast_dtype", "resolve_device", "init_distributed",
    "broadcast_buffers", "process_group",
]

#: ``--amp`` names -> autocast dtype. Quantizers leave autocast and compute in float32 (their rounding,
#: scales and gradients); the conv/linear layers take the fake-quantized values in this dtype.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16}
DEVICE_CHOICES = "cpu, cuda, cuda:N, auto"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or ``None`` where it is off (or not available)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU; a CUDA device must exist here."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device {name!r} is not a device; allowed: {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "meta"):
        raise ConfigError(f"--device {name!r} is not supported; allowed: {DEVICE_CHOICES}")
    return device


@dataclass(frozen=True)
class Placement:
    """A process's device, its autocast dtype (``amp``: a key of :data:`AMP_DTYPES`, or ``None``) and rank."""

    device: torch.device = torch.device("cpu")
    amp: str | None = None
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ConfigError(f"--amp {self.amp!r} is not supported; allowed: {', '.join(AMP_DTYPES)}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside the world of {self.world_size} processes")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of a global batch on its device, and the factor that turns the mean loss over
        the share into its part of the global mean (DDP then averages over ranks)."""
        if self.distributed:
            total = len(y)
            x, y = x[self.rank:: self.world_size], y[self.rank:: self.world_size]
            weight = len(y) * self.world_size / total
        else:
            weight = 1.0
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), weight

    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """The module to call in training: ``model`` itself, or a DDP wrapper of it across the ranks."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are broadcast after each step (fxquant.placement.broadcast_buffers), not before each forward
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False,
                                                   find_unused_parameters=find_unused_parameters)


def init_distributed(device: torch.device, amp: str | None = None, timeout_s: float = 300.0) -> Placement:
    """The placement of this process: joins the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on
    CUDA, gloo on the CPU); a CUDA process takes the GPU of its ``LOCAL_RANK`` unless one is named."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Placement(device, amp)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Placement(device, amp, rank, world)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers to every rank, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in model.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for dtype, buffers in by_dtype.items():
        flat = _flatten_dense_tensors(buffers)
        wire = flat.to(torch.uint8) if dtype == torch.bool else flat  # gloo has no bool collectives
        dist.broadcast(wire, src)
        for buffer, value in zip(buffers, _unflatten_dense_tensors(wire.to(dtype), buffers), strict=True):
            buffer.copy_(value)


@contextlib.contextmanager
def process_group(placement: Placement) -> Iterator[Placement]:
    """Leave the process group when the run ends (so a failed rank does not hang the others)."""
    try:
        yield placement
    finally:
        if placement.distributed and dist.is_initialized():
            dist.destroy_process_group()
