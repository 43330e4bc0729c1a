"""A small training loop for QAT on CPU: progress bars, schedule callbacks, NaN detection by layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from fxquant.errors import NumericsError

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
) -> float:
    """One pass over ``loader``; returns the mean loss. ``on_step(step)`` runs after each optimizer step
    (drive quantizer schedules from it); ``clip_grad_norm`` bounds each step (QN and QAT of deep nets
    need it). A non-finite loss raises :class:`NumericsError` naming the layer."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        logits = model(x)
        loss = loss_fn(logits, y, x) if loss_fn is not None else nn.functional.cross_entropy(logits, y)
        if not math.isfinite(loss.item()):
            layer = first_non_finite_layer(model, x)
            raise NumericsError(
                f"loss became {loss.item()} at step {step}" + (f"; first non-finite output in layer {layer!r}" if layer
                                                                else "; all layer outputs are finite (loss itself)")
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step)
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False) -> float:
    """Top-1 accuracy in percent (eval mode)."""
    model.eval()
    correct, count = 0, 0
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        correct += int((model(x).argmax(1) == y).sum())
        count += len(y)
    return 100.0 * correct / max(count, 1)
