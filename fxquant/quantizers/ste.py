"""STE baseline: min/max-calibrated uniform quantization with the straight-through estimator.

The range comes from the data (weights: per-channel max|w| at every step; activations: an exponential
moving average of the batch min/max during training), nothing is learned, and the gradient passes
through rounding unchanged inside the range and is zero outside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.errors import ConfigError
from fxquant.quantizers.base import Quantizer, block_scratch, elementwise_blocks, split_blocks
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import register_quantizer

__all__ = ["STEQuantizer", "STEOptions"]


def _ste_block(x, low, step, n, lo, hi, out, hard) -> None:
    """One block of :class:`_STEFunction`'s forward, in place (``lo``/``hi``: the range as floats)."""
    torch.sub(x, low, out=hard).div_(step).add_(0.5).floor_().clamp_(0, n).mul_(step).add_(low)
    # x + (hard − x) inside the range, hard outside: (x + (hard − x)) − hard is exact (the two are within
    # an ulp), so masking it and adding hard back gives either value bit for bit, without a bool tensor
    torch.sub(hard, x, out=out).add_(x).sub_(hard)
    torch.ops.aten.hardtanh_backward.grad_input(out, x, lo, hi, grad_input=out).add_(hard)


class _STEFunction(torch.autograd.Function):
    """The training forward of :class:`STEQuantizer` for a per-tensor range, fused.

    Same values as ``where(inside, x + (hard − x).detach(), hard.detach())`` and gradient
    ``1{l ≤ x ≤ u}``, in one chain of in-place passes per block of the feature map (autograd of the
    original makes about fifteen full-size passes, several of them through bool masks, which are slow on
    CPU). Saves only ``x``. At the range ends (where the open mask of ``hardtanh_backward`` differs from the
    closed one) ``x + (hard − x)`` equals ``hard``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
        lo = float(low)
        hi = float(low + step * n)
        out = torch.empty_like(x)
        if elementwise_blocks(x, low, step):
            scratch = block_scratch(1, x.numel(), x)
            for xb, outb in split_blocks(x, out):
                _ste_block(xb, low, step, n, lo, hi, outb, scratch(xb.numel())[1][0])
        else:
            _ste_block(x, low, step, n, lo, hi, out, torch.empty_like(x))
        ctx.save_for_backward(x)
        ctx.range = (lo, hi)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.range
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        pieces = split_blocks(x, grad, grad_x) if x.is_contiguous() and elementwise_blocks(x) else [(x, grad, grad_x)]
        for xb, gb, gxb in pieces:  # 1{l ≤ x ≤ u}: x equals its clamp (a float mask, in place)
            torch.eq(xb, torch.clamp(xb, lo, hi, out=gxb), out=gxb).mul_(gb)
        return grad_x, None, None, None


@dataclass(frozen=True, eq=False)
class STEOptions(QuantizerOptions):
    """``momentum``: the weight of each training batch's min/max in the activation range's moving average
    (0 keeps the range of the first batch)."""

    momentum: float = 0.1

    def check(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"quantizer_options momentum={self.momentum!r} is invalid: expected 0 <= momentum <= 1")


@register_quantizer("ste")
class STEQuantizer(Quantizer):
    """Min/max-calibrated uniform quantization with the straight-through estimator (no learned parameter)."""

    options_class = STEOptions
    options: STEOptions

    def __init__(self, bits, role, channels=None, options=None):
        super().__init__(bits, role, channels, options)
        shape = (self.num_params,) if role == "weight" and channels else ()
        self.register_buffer("low", torch.zeros(shape))
        self.register_buffer("high", torch.ones(shape))

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.role == "weight":
            flat = x.detach().reshape(x.shape[0], -1) if self.channels else x.detach().reshape(1, -1)
            high = flat.abs().amax(dim=1).clamp_min(1e-8)
            high = high if self.channels else high.reshape(())
            return -high, high
        x_min, x_max = torch.aminmax(x.detach())  # one pass for both
        low = torch.clamp(x_min, max=0.0)
        return low, torch.maximum(x_max, low + 1e-8)

    def initialize(self, x: torch.Tensor) -> None:
        low, high = self._observe(x)
        self.low.copy_(low)
        self.high.copy_(high)

    def grid(self) -> QuantGrid:
        n = 2**self.bits - 1
        if self.role == "weight":
            return QuantGrid(self.bits, "bipolar", self.high / n, torch.zeros_like(self.high))
        return QuantGrid(self.bits, "unsigned", (self.high - self.low) / n, self.low)

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            low, high = self._observe(x)
            if self.role == "weight":
                self.low.copy_(low)
                self.high.copy_(high)
            else:
                m = self.options.momentum
                self.low.lerp_(low, m)
                self.high.lerp_(high, m)
        grid = self.grid()
        lo, step = self.view(grid.low, x), self.view(grid.step, x)
        if lo.numel() == 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return _STEFunction.apply(x, lo, step, 2**self.bits - 1)
        inside = (x >= lo) & (x <= lo + step * (2**self.bits - 1))
        hard = self.hard_forward(x)
        return torch.where(inside, x + (hard - x).detach(), hard.detach())
