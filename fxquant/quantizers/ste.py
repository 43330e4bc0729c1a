"""STE baseline: min/max-calibrated uniform quantization with the straight-through estimator.

The range comes from the data (weights: per-channel max|w| at every step; activations: an exponential
moving average of the batch min/max during training), nothing is learned, and the gradient passes
through rounding unchanged inside the range and is zero outside it.
"""

from __future__ import annotations

import torch

from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.registry import register_quantizer

__all__ = ["STEQuantizer"]


@register_quantizer("ste")
class STEQuantizer(Quantizer):
    OPTIONS = {"momentum": 0.1}

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
        low = torch.clamp(x.detach().min(), max=0.0)
        return low, torch.maximum(x.detach().max(), low + 1e-8)

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
                m = float(self.options["momentum"])
                self.low.lerp_(low, m)
                self.high.lerp_(high, m)
        grid = self.grid()
        lo, step = self.view(grid.low, x), self.view(grid.step, x)
        inside = (x >= lo) & (x <= lo + step * (2**self.bits - 1))
        hard = self.hard_forward(x)
        return torch.where(inside, x + (hard - x).detach(), hard.detach())
