"""DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019, arXiv 1908.05033).

The clip range ``[l, u]`` is cut into ``2**b - 1`` intervals of width ``Δ``; inside interval ``i`` the
staircase is replaced by ``φ(x) = s·tanh(k(x − m_i))`` with ``m_i`` the interval centre, ``s = 1/(1−α)``
and ``k = ln(2/α − 1)/Δ`` (Eq. 3-8). The forward value is the hard staircase (sgn φ, i.e. rounding); the
gradient is that of the soft function, with the straight-through estimator only across the sign
(Algorithm 1). α, l and u are learned.

Weights use the symmetric clip ``l = −u`` so their levels are odd integers × ``u/(2**b−1)``: exactly the
bipolar encoding of the bit-serial kernels (a learned offset could not be folded into a bias, since it
multiplies the input). Activations whose first batch is non-negative keep ``l = 0`` and become unsigned
codes; others learn ``l`` too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.quantizers.base import Quantizer, search_clip_range
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.registry import register_quantizer

__all__ = ["DSQQuantizer", "dsq_soft"]

ALPHA_MIN = 1e-4
ALPHA_MAX = 0.5 - 1e-4


def dsq_soft(x: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
    """The paper's Q_S (Eq. 3-5): piecewise tanh between the levels ``low + i·step``."""
    n = 2**bits - 1
    high = low + step * n
    xc = torch.minimum(torch.maximum(x, low), high)
    i = torch.clamp(torch.floor((xc - low) / step), 0, n - 1).detach()
    centre = low + (i + 0.5) * step
    alpha = alpha.clamp(ALPHA_MIN, ALPHA_MAX)
    s = 1.0 / (1.0 - alpha)
    k = torch.log(2.0 / alpha - 1.0) / step
    phi = s * torch.tanh(k * (xc - centre))
    return low + step * (i + (phi + 1.0) / 2.0)


class _DSQStraightThrough(torch.autograd.Function):
    """Forward: the hard staircase. Backward: the exact derivative of ``dsq_soft`` (Eq. 3-5, 10).

    With ``t = (x − l)/Δ`` clamped to ``[0, n]``, ``r = t − i − ½``, ``K = kΔ = ln(2/α − 1)`` and
    ``τ = tanh(K r)``: ∂Q/∂x = (sK/2)(1 − τ²) inside the range; ∂Q/∂l = 1 − ∂Q/∂x;
    ∂Q/∂Δ = i + (sτ + 1)/2 − t·∂Q/∂x; ∂Q/∂α = (Δ/2)(s²τ + s(1 − τ²) r dK/dα). One fused pass instead of
    a dozen autograd nodes per tensor makes the soft quantizer cheap enough for CPU training.
    """

    @staticmethod
    def forward(ctx, x, low, step, alpha, bits: int):
        n = 2**bits - 1
        t = (x - low) / step
        tc = t.clamp(0, n)
        a = alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        big_k = torch.log(2.0 / a - 1.0)
        i = torch.floor(tc).clamp_(max=n - 1)
        tau = torch.tanh(big_k * (tc - i - 0.5))
        ctx.save_for_backward(t, tau, low, step, alpha)
        ctx.bits = bits
        return low + step * torch.floor(t + 0.5).clamp_(0, n)

    @staticmethod
    def backward(ctx, grad):
        t, tau, low, step, alpha = ctx.saved_tensors
        n = 2**ctx.bits - 1
        a = alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        s = 1.0 / (1.0 - a)
        big_k = torch.log(2.0 / a - 1.0)
        inside = (t >= 0) & (t <= n)
        tc = t.clamp(0, n)
        i = torch.floor(tc).clamp_(max=n - 1)
        sech2 = 1.0 - tau * tau
        dq_dx = torch.where(inside, (s * big_k / 2.0) * sech2, torch.zeros_like(sech2))
        grad_x = grad * dq_dx
        grad_low = (grad - grad_x).sum_to_size(low.shape) if low.requires_grad else None
        grad_step = None
        if step.requires_grad:
            grad_step = (grad * (i + (s * tau + 1.0) / 2.0 - tc * dq_dx)).sum_to_size(step.shape)
        grad_alpha = None
        if alpha.requires_grad:
            dk = -2.0 / (a * (2.0 - a))
            inner = step * (s * s * tau + s * sech2 * (tc - i - 0.5) * dk) / 2.0
            grad_alpha = (grad * inner).sum().reshape(alpha.shape)
            grad_alpha = grad_alpha * ((alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX))
        return grad_x, grad_low, grad_step, grad_alpha, None


@register_quantizer("dsq")
class DSQQuantizer(Quantizer):
    """DSQ with learnable α (bounded to (0, 0.5)) and learnable clipping bounds."""

    OPTIONS = {"alpha": 0.2, "learn_alpha": True}

    def __init__(self, bits, role, channels=None, options=None):
        super().__init__(bits, role, channels, options)
        alpha = float(self.options["alpha"])
        if not 0.0 < alpha < 0.5:
            from fxquant.errors import ConfigError

            raise ConfigError(f"quantizer_options alpha={alpha!r} is invalid: DSQ needs 0 < alpha < 0.5")
        self.upper = nn.Parameter(torch.ones(self.num_params if role == "weight" else ()))
        if role == "activation":
            self.lower = nn.Parameter(torch.zeros(()))
            self.register_buffer("signed", torch.tensor(False))
        if self.options["learn_alpha"]:
            self.alpha = nn.Parameter(torch.tensor(alpha))
        else:
            self.register_buffer("alpha", torch.tensor(alpha))

    def initialize(self, x: torch.Tensor) -> None:
        if self.role == "weight":
            _, high = search_clip_range(x, self.bits, signed=True, per_channel=bool(self.channels))
            self.upper.copy_(high)
        else:
            signed = bool(x.min() < 0)
            self.signed.fill_(signed)
            low, high = search_clip_range(x, self.bits, signed=False, per_channel=False)
            self.lower.copy_(low if signed else torch.zeros(()))
            self.upper.copy_(high)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.role == "weight":
            u = self.upper.abs().clamp_min(1e-8)
            return -u, u
        # unsigned: l = 0, kept in the graph with a zero gradient so that DDP sees every parameter used
        low = self.lower.clamp_max(0.0) if bool(self.signed) else self.lower * 0.0
        return low, torch.maximum(self.upper, low + 1e-8)

    def grid(self) -> QuantGrid:
        low, high = self._bounds()
        n = 2**self.bits - 1
        if self.role == "weight":
            return QuantGrid(self.bits, "bipolar", high / n, torch.zeros_like(high))
        return QuantGrid(self.bits, "unsigned", (high - low) / n, low)

    def soft_function(self, x: torch.Tensor) -> torch.Tensor:
        """Q_S without the straight-through sign: the differentiable surrogate itself."""
        grid = self.grid()
        low, step = self.view(grid.low, x), self.view(grid.step, x)
        return dsq_soft(x, low, step, self.bits, self.alpha)

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hard value, soft gradient: equal to ``soft + (hard − soft).detach()`` (Algorithm 1), fused."""
        grid = self.grid()
        low, step = self.view(grid.low, x), self.view(grid.step, x)
        return _DSQStraightThrough.apply(x, low, step, self.alpha, self.bits)

    def characteristic(self) -> tuple[float, float]:
        """(α, k·Δ): how far the soft function is from the staircase (α → 0 is hard)."""
        a = float(self.alpha.detach().clamp(ALPHA_MIN, ALPHA_MAX))
        return a, math.log(2.0 / a - 1.0)


