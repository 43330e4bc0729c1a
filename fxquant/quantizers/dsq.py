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
from dataclasses import dataclass

import torch
from torch import nn

from fxquant.errors import ConfigError
from fxquant.quantizers.base import (
    BinaryScale,
    Quantizer,
    add_flag,
    block_scratch,
    elementwise_blocks,
    read_flag,
    search_clip_range,
    split_blocks,
    write_flag,
)
from fxquant.quantizers.compiled import dsq as dsq_kernels
from fxquant.quantizers.compiled.runtime import kernels_enabled
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import register_quantizer

__all__ = ["DSQQuantizer", "DSQOptions", "dsq_soft"]

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


def _constants(alpha: torch.Tensor) -> tuple:
    """``(s, K, dK/dα, 1{α inside its clamp})`` of the clamped α.

    Plain floats in eager CPU mode, where a dozen scalar tensor ops per call would cost more than the
    small weight tensors' own work; tensors while compiling (no graph break) or on other devices (no sync).
    """
    if torch.compiler.is_compiling() or alpha.device.type != "cpu":
        a = alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        big_k = torch.log(2.0 / a - 1.0)
        live = (alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX)
    else:
        raw = float(alpha)
        a = min(max(raw, ALPHA_MIN), ALPHA_MAX)
        big_k = math.log(2.0 / a - 1.0)
        live = float(ALPHA_MIN <= raw <= ALPHA_MAX)
    return 1.0 / (1.0 - a), big_k, -2.0 / (a * (2.0 - a)), live


def _hard(x: torch.Tensor, low: torch.Tensor | None, step: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out = l + Δ·clamp(floor((x − l)/Δ + ½), 0, n)``, the hard quantizer's arithmetic (``low=None``: l = 0)."""
    t = torch.div(x, step, out=out) if low is None else torch.sub(x, low, out=out).div_(step)
    t.clamp_(0, n).add_(0.5).floor_().mul_(step)  # clipping before rounding gives the same codes
    if low is not None:
        out.add_(low)


def _soft_terms(x, grad, low, step, n, two_k, two_s_k, grad_x, tc, frac, sig, mask, z, slope) -> None:
    """The per-element terms of the backward, in place (``low=None``: l = 0).

    ``tc`` is ``t`` clipped to ``[0, n]``, ``frac = tc − i`` with ``i = floor(tc)``, ``sig = σ(2K r)`` with
    ``r = frac − ½``, ``z = 2K r``, ``slope = grad·σ(1 − σ)`` and ``grad_x = grad·∂Q/∂x``; ``mask`` is
    scratch. At ``tc = n`` this takes ``i = n, r = −½`` where the paper's intervals give ``i = n − 1,
    r = ½``: every derivative is continuous there (``sτ = ±1`` at both ends), so the gradient is the same
    and ``i`` needs no clamp.
    """
    t = torch.div(x, step, out=frac) if low is None else torch.sub(x, low, out=frac).div_(step)
    torch.clamp(t, 0, n, out=tc)
    # the closed range as a float mask (a comparison written into a float tensor: bool masks are slow on CPU)
    torch.eq(t, tc, out=mask)
    torch.frac(tc, out=frac)
    torch.sub(frac, 0.5, out=z).mul_(two_k)  # 2K·r
    torch.sigmoid(z, out=sig)
    torch.ops.aten.sigmoid_backward.grad_input(grad, sig, grad_input=slope)
    torch.mul(slope, mask, out=grad_x).mul_(two_s_k)  # ∂Q/∂x = (sK/2)(1 − τ²) = 2sK·σ(1 − σ) inside


def _torch_block_sums(x, grad, grad_x, start, low, step, n, consts) -> torch.Tensor:
    """The backward's seven sums (see ``compiled.dsq.dsq_backward``) from element ``start`` on, in cached blocks."""
    pieces = split_blocks(*(t.view(-1)[start:] for t in (x, grad, grad_x)))
    scratch = block_scratch(6, x.numel() - start, x)
    # per block: Σ g·tc, Σ g·frac, Σ g·σ (one product) and Σ g, Σ g_x·tc, Σ g_x, Σ g·σ(1 − σ)·2K r
    three = torch.empty((len(pieces), 3), dtype=x.dtype, device=x.device)
    four = torch.empty((4, len(pieces)), dtype=x.dtype, device=x.device)
    three_out, four_out = three.unbind(0), [row.unbind(0) for row in four]
    for j, (xb, gb, gxb) in enumerate(pieces):
        rows, (tc, frac, sig, mask, z, slope) = scratch(xb.numel())
        _soft_terms(xb, gb, low, step, n, *consts, gxb, tc, frac, sig, mask, z, slope)
        torch.mv(rows[:3], gb, out=three_out[j])
        # plain sums for Σ g and Σ g_x (more accurate than BLAS products): l's gradient is their difference
        torch.sum(gb, 0, out=four_out[0][j])
        torch.dot(gxb, tc, out=four_out[1][j])
        torch.sum(gxb, 0, out=four_out[2][j])
        torch.dot(slope, z, out=four_out[3][j])
    return torch.cat((three.sum(0), four.sum(1)))


class _DSQStraightThrough(torch.autograd.Function):
    """Forward: the hard staircase. Backward: the exact derivative of ``dsq_soft`` (Eq. 3-5, 10).

    With ``t = (x − l)/Δ`` clamped to ``[0, n]``, ``r = t − i − ½``, ``K = kΔ = ln(2/α − 1)`` and
    ``τ = tanh(K r)``: ∂Q/∂x = (sK/2)(1 − τ²) inside the range; ∂Q/∂l = 1 − ∂Q/∂x;
    ∂Q/∂Δ = i + (sτ + 1)/2 − t·∂Q/∂x; ∂Q/∂α = (Δ/2)(s²τ + s(1 − τ²) r dK/dα).

    The activation quantizer runs on every feature map, so on CPU its elementwise passes cost as much as
    the convolutions of a small net. The forward computes only the hard value and saves ``x`` (which the
    preceding layer keeps anyway); the backward recomputes the soft terms block by block, so that they
    stay in cache, and reduces them with dot products: no feature-map-sized tensor is kept for it. ``τ``
    goes through ``σ = sigmoid(2K r)`` (``τ = 2σ − 1``, ``1 − τ² = 4σ(1 − σ)``), several times cheaper
    than ``tanh`` on CPU. ``low_is_zero`` (unsigned activations) skips subtracting and adding ``l = 0``,
    which changes no bit.
    """

    @staticmethod
    def forward(ctx, x, low, step, alpha, bits: int, low_is_zero: bool = False):
        n = 2**bits - 1
        out = torch.empty_like(x)
        zero = None if low_is_zero else low
        head = 0
        kernel = dsq_kernels.forward_kernel(has_low=not low_is_zero)
        if low.numel() == 1 and step.numel() == 1 and kernels_enabled(kernel, x):
            head = dsq_kernels.dsq_forward(x, out, None if zero is None else float(low), float(step), n)
        if head or elementwise_blocks(x, low, step):  # the rest of a contiguous tensor, in cached blocks
            for xb, outb in split_blocks(*(t.view(-1)[head:] for t in (x, out))):
                _hard(xb, zero, step, n, outb)
        else:
            _hard(x, zero, step, n, out)
        ctx.save_for_backward(x, low, step, alpha)
        ctx.bits, ctx.low_is_zero = bits, low_is_zero
        return out

    @staticmethod
    def backward(ctx, grad):
        x, low, step, alpha = ctx.saved_tensors
        n = 2**ctx.bits - 1
        zero = None if ctx.low_is_zero else low
        s, big_k, dk, alpha_live = _constants(alpha)
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        per_tensor = low.numel() == 1 and step.numel() == 1
        use_kernel = per_tensor and kernels_enabled("dsq_backward", x)
        if not (use_kernel or x.is_contiguous() and elementwise_blocks(grad, low, step)):
            # weights (per channel), small tensors, compiled graphs: a few whole-tensor passes
            terms = torch.empty((6, *x.shape), dtype=x.dtype, device=x.device)
            tc, frac, sig, mask, z, slope = terms.unbind(0)
            _soft_terms(x, grad, zero, step, n, 2.0 * big_k, 2.0 * s * big_k, grad_x, tc, frac, sig, mask, z, slope)
            torch.mul(grad_x, tc, out=mask)
            z.mul_(slope)
            terms[:3].mul_(grad)
            slope.copy_(grad)
            # rows: g·tc, g·frac, g·σ, g_x·tc, g·σ(1 − σ)·2K r, g
            sums = terms.sum_to_size((6, *[1] * (x.dim() - step.dim()), *step.shape)).reshape(6, *step.shape)
            sum_tc, sum_frac, sum_sig, sum_gx_tc, sum_slope_z, sum_g = sums.unbind(0)
            sum_gx = grad_x.sum_to_size(low.shape)
        else:  # per-tensor grid, eager: one TVM pass, or blocks that stay in cache
            consts = (2.0 * big_k, 2.0 * s * big_k)
            # Σ g·tc, Σ g·frac, Σ g·σ, Σ g, Σ g_x·tc, Σ g_x, Σ g·σ(1 − σ)·2K r
            sums, head = [], 0
            if use_kernel:
                low_value = 0.0 if zero is None else float(low)
                head, kernel_sums = dsq_kernels.dsq_backward(x, grad, grad_x, low_value, float(step), n, *consts)
                sums.append(kernel_sums)
            if head < x.numel():
                sums.append(_torch_block_sums(x, grad, grad_x, head, zero, step, n, consts))
            sum_tc, sum_frac, sum_sig, sum_g, sum_gx_tc, sum_gx, sum_slope_z = sum(sums).unbind(0)
        grad_low = grad_step = grad_alpha = None
        if ctx.needs_input_grad[1]:  # Σ g·(1 − ∂Q/∂x)
            grad_low = sum_g.sum_to_size(low.shape) - sum_gx
        if ctx.needs_input_grad[2]:  # Σ g·(i + (sτ + 1)/2 − t·∂Q/∂x), i = tc − frac, sτ = s(2σ − 1)
            grad_step = sum_tc - sum_frac + s * sum_sig + (1.0 - s) / 2.0 * sum_g - sum_gx_tc
        if ctx.needs_input_grad[3]:  # Σ g·Δ(s²σ − s²/2 + s·dK/dα·σ(1 − σ)·2r)
            inner = s * s * (sum_sig - sum_g / 2.0) + s * dk / big_k * sum_slope_z
            grad_alpha = (step * inner).sum().reshape(alpha.shape) * alpha_live
        return grad_x if ctx.needs_input_grad[0] else None, grad_low, grad_step, grad_alpha, None, None


@dataclass(frozen=True, eq=False)
class DSQOptions(QuantizerOptions):
    """``alpha``: the initial α (distance of the soft function from the staircase), ``0 < α < 0.5``;
    ``learn_alpha``: train α (else a fixed buffer); ``binary_scale``: the scale of 1-bit weights."""

    alpha: float = 0.2
    learn_alpha: bool = True
    binary_scale: BinaryScale = "mean"

    def check(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"quantizer_options alpha={self.alpha!r} is invalid: DSQ needs 0 < alpha < 0.5")


@register_quantizer("dsq")
class DSQQuantizer(Quantizer):
    """DSQ with learnable α (bounded to (0, 0.5)) and learnable clipping bounds."""

    options_class = DSQOptions
    options: DSQOptions

    def __init__(self, bits, role, channels=None, options=None):
        super().__init__(bits, role, channels, options)
        alpha = self.options.alpha
        self.upper = nn.Parameter(torch.ones(self.num_params if role == "weight" else ()))
        if role == "activation":
            self.lower = nn.Parameter(torch.zeros(()))
            add_flag(self, "signed", False)
        if self.options.learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(alpha))
        else:
            self.register_buffer("alpha", torch.tensor(alpha))
        self._register_binary_scale()

    def initialize(self, x: torch.Tensor) -> None:
        if self.role == "weight":
            _, high = search_clip_range(x, self.bits, signed=True, per_channel=bool(self.channels))
            self.upper.copy_(high)
            self.track_weight(x)
        else:
            signed = bool(x.min() < 0)
            write_flag(self, "signed", signed)
            low, high = search_clip_range(x, self.bits, signed=False, per_channel=False)
            self.lower.copy_(low if signed else torch.zeros(()))
            self.upper.copy_(high)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.role == "weight":
            u = self.upper.abs().clamp_min(1e-8)
            return -u, u
        # unsigned: l = 0, kept in the graph with a zero gradient so that DDP sees every parameter used
        low = self.lower.clamp_max(0.0) if read_flag(self, "signed") else self.lower * 0.0
        return low, torch.maximum(self.upper, low + 1e-8)

    def grid(self) -> QuantGrid:
        low, high = self._bounds()
        n = 2**self.bits - 1
        if self.binary_mean_scale:
            return QuantGrid(1, "bipolar", self.binary_scale, torch.zeros_like(self.binary_scale))
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
        if self.binary_mean_scale:
            # the soft sign of DSQ's one interval [−max|w|, max|w|], scaled by mean|w|; the learned clip is unused
            # (kept in the graph with a zero gradient for DDP)
            return self.binary_forward(x, self._unit_sign) + self.upper.sum() * 0.0
        n = 2**self.bits - 1
        # l and Δ of grid() with the same arithmetic, minus the steps that change no value (an offset of 0,
        # a multiplier of 1): each small op here is an autograd node, on every step and quantizer
        if self.role == "weight":
            scale = self.upper.abs().clamp_min(1e-8) / n
            low, step = self.view(scale * -n, x), self.view(scale * 2, x)  # 0 + scale·(−n) is scale·(−n) (< 0)
            return _DSQStraightThrough.apply(x, low, step, self.alpha, self.bits, False)
        signed = read_flag(self, "signed")
        low = self.lower.clamp_max(0.0) if signed else self.lower * 0.0
        step = (torch.maximum(self.upper, low + 1e-8) - low) / n
        if signed:  # QuantGrid.low keeps the sign of a zero bound this way; unsigned, the value of l is unused
            low = low + step * 0
        return _DSQStraightThrough.apply(x, low, step, self.alpha, self.bits, not signed)

    def _unit_sign(self, x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """``±1`` by the sign of ``x`` with DSQ's soft gradient on ``[−window, window]`` (one interval)."""
        return _DSQStraightThrough.apply(x, -window, 2.0 * window, self.alpha, 1, False) / window

    def characteristic(self) -> tuple[float, float]:
        """(α, k·Δ): how far the soft function is from the staircase (α → 0 is hard)."""
        a = float(self.alpha.detach().clamp(ALPHA_MIN, ALPHA_MAX))
        return a, math.log(2.0 / a - 1.0)


