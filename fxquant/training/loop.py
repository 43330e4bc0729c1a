"""A small QAT training loop on any device: progress bars, schedule callbacks, NaN detection by layer.

Under a :class:`~fxquant.placement.Placement` each batch moves to the run's device (its rank's share of it
under torchrun), the forward runs under its autocast, and after each step rank 0's buffers are broadcast.
The loss is kept on the device; the only host synchronisation per step is the finiteness check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fxquant.errors import NumericsError
from fxquant.placement import Placement, broadcast_buffers

__all__ = ["train_epoch", "evaluate", "first_non_finite_layer"]


def first_non_finite_layer(model: nn.Module, x: torch.Tensor) -> str | None:
    """Run ``x`` through ``model`` and name the first module whose output holds a NaN or Inf."""
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if name:  # every submodule: the innermost one to finish first with a bad output is named
            def hook(mod, inp, out, name=name):
                if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                    found.append(name)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    description: str = "train",
    max_steps: int | None = None,
    clip_grad_norm: float | None = None,
    placement: Placement | None = None,
) -> float:
    """One pass over ``loader``; returns the mean loss (over every rank's samples). ``on_step(step)`` runs
    after each optimizer step (drive quantizer schedules from it); ``clip_grad_norm`` bounds each step (QN
    and QAT of deep nets need it). ``model`` may be the DDP wrapper of :meth:`Placement.wrap`. A
    non-finite loss raises :class:`NumericsError` naming the layer."""
    placement = placement if placement is not None else Placement(_device_of(model))
    inner = getattr(model, "module", model)  # the prepared model inside a DDP wrapper
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=placement.device)
    count = 0
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        x, y, weight = placement.shard(x, y)
        with placement.autocast():
            logits = model(x)
        logits = logits.float()
        loss = loss_fn(logits, y, x) if loss_fn is not None else nn.functional.cross_entropy(logits, y)
        if not bool(torch.isfinite(loss.detach())):
            layer = first_non_finite_layer(inner, x)
            raise NumericsError(
                f"loss became {loss.item()} at step {step}" + (f"; first non-finite output in layer {layer!r}" if layer
                                                                else "; all layer outputs are finite (loss itself)")
            )
        optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if placement.distributed:
            broadcast_buffers(inner)
        if on_step is not None:
            on_step(step)
        total += loss.detach().double() * len(y)
        count += len(y)
        if progress:
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    if placement.distributed:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        dist.all_reduce(sums)
        total, count = sums[0], int(sums[1])
    return float(total) / max(count, 1)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: bool = False,
    placement: Placement | None = None,
) -> float:
    """Top-1 accuracy in percent (eval mode: the deployed integer arithmetic), on the model's device."""
    placement = placement if placement is not None else Placement(_device_of(model))
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=placement.device)
    count = 0
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        x, y = x.to(placement.device, non_blocking=True), y.to(placement.device, non_blocking=True)
        correct += (model(x).argmax(1) == y).sum()  # eval is the integer arithmetic: never under autocast
        count += len(y)
    return 100.0 * int(correct) / max(count, 1)
