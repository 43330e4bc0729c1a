"""LCQ: Learnable Companding Quantization (Yamamoto, CVPR 2021, arXiv 2103.07156).

Clip, compress, round, expand::

    Q(x) = sgn(x)·α·g⁻¹( q_b( g(|x|/α) ) )   if |x| < α,        sgn(x)·α otherwise,      q_b(y) = round(s·y)/s

with ``s = 2^b − 1`` for (unsigned) activations and ``s = 2^(b−1) − 1`` for (symmetric) weights, a learned
clip ``α`` and a learned compander ``g``, piecewise linear on ``K`` equal input segments with slopes
``γ_k = K·softmax(θ)_k`` and output breakpoints ``β_k = Σ_{j<k} softmax(θ)_j`` (``θ = 0``: the uniform
quantizer). The straight-through estimator covers the whole quantizer for ``x`` and ``α`` and only the
rounding for the compander, whose gradients flow through both ``g`` and ``g⁻¹``; the backward evaluates
those formulas directly, in one fused autograd function.

Levels are non-uniform: the grid is a ``"codebook"`` requantized to an 8-bit lookup table for the integer
graph, with codes from the decision thresholds ``α·g⁻¹((j − ½)/s)``. The gradient formulas, and our choices
where the paper is silent (weight normalisation, 1- and 2-bit weights, signed activations, the initial
``α``): docs/design.md, section "LCQ".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxquant.errors import ConfigError
from fxquant.quantizers.base import (
    Quantizer,
    Role,
    add_flag,
    block_scratch,
    elementwise_blocks,
    read_flag,
    split_blocks,
    write_flag,
)
from fxquant.quantizers.compiled import lcq as lcq_kernels
from fxquant.quantizers.compiled.runtime import kernels_enabled
from fxquant.quantizers.grid import QuantGrid, requantize_levels, threshold_codes
from fxquant.quantizers.lsq import grad_scale
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import register_quantizer

__all__ = ["LCQQuantizer", "LCQOptions", "compander", "compand", "expand", "lcq_quantize"]


def compander(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ, β)``: slopes ``K·softmax(θ)`` and output breakpoints ``Σ_{j<k} softmax(θ)_j`` (``β_0 = 0``)."""
    p = torch.softmax(theta, dim=0)
    k = theta.numel()
    beta = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)[:-1]])
    return k * p, beta


def compand(v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``g(v) = γ_k·(v − d_k) + β_k`` for ``v ∈ [d_k, d_k+1)``, ``v ∈ [0, 1]``."""
    k_count = gamma.numel()
    k = torch.clamp(torch.floor(v.detach() * k_count), 0, k_count - 1).long()
    return gamma[k] * (v - k.to(v.dtype) / k_count) + beta[k]


def expand(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``g⁻¹(y) = (y − β_k)/γ_k + d_k`` with ``k`` the last segment whose breakpoint ``β_k ≤ y``."""
    k_count = gamma.numel()
    k = torch.searchsorted(beta.detach().to(y.dtype).contiguous(), y.detach().contiguous(), right=True) - 1
    k = torch.clamp(k, 0, k_count - 1)
    return (y - beta[k]) / gamma[k] + k.to(y.dtype) / k_count


def _level_tables(gamma, beta, s, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per level ``j``: ``j/s``, its segment ``k_q`` and ``g⁻¹(j/s)`` (with ``g⁻¹(1) = 1`` exactly)."""
    k = gamma.numel()
    levels = torch.arange(s + 1, dtype=dtype, device=device) / s
    kq = torch.clamp(torch.searchsorted(beta.contiguous(), levels, right=True) - 1, 0, k - 1)
    u_table = (levels - beta[kq]) / gamma[kq] + kq.to(dtype) / k  # g⁻¹(j/s)
    u_table[-1] = 1.0  # g⁻¹(1) = 1 exactly, so clipped inputs give exactly sgn(x)·α
    return levels, kq, u_table


def _gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = table[index]`` for a small 1-D table (``index_select`` is several times faster than ``take``)."""
    torch.index_select(table, 0, index.view(-1), out=out.view(-1))
    return out


def _lcq_levels(x, alpha, gamma, beta, u_table, s, symmetric, u, v, seg, index, code=None) -> None:
    """``u = g⁻¹(q_b(g(min(|x|/α, 1))))`` in place, with the arithmetic of the original forward.

    ``v``, ``seg`` (float) and ``index`` (int) are scratch. ``code``, if given, receives ``kx·(s + 1) + j``
    for every element (its segment and level in one small integer), which the backward reuses; ``v`` is
    then scratch for it. ``gamma`` ``None`` is the uniform quantizer. Unsigned mode clips negative inputs
    to 0.
    """
    torch.abs(x, out=v) if symmetric else torch.clamp_min(x, 0.0, out=v)
    v.div_(alpha).clamp_(max=1.0)
    if gamma is None:
        torch.mul(v, s, out=u).add_(0.5).floor_().div_(s)
        return
    k = gamma.numel()
    index.copy_(torch.mul(v, k, out=seg).floor_().clamp_(0, k - 1))
    v.sub_(seg.div_(k))  # v − d_kx
    torch.mul(v, _gather(gamma, index, u), out=u)  # γ_kx·(v − d_kx)
    if code is not None:
        torch.mul(index, s + 1, out=v)  # kx·(s + 1), exact in float
    u.add_(_gather(beta, index, seg)).mul_(s).add_(0.5).floor_().clamp_(0, s)
    index.copy_(u)  # j = round(s·g(v))
    if code is not None:
        code.copy_(v.add_(u))
    _gather(u_table, index, u)


def _lcq_value(x, alpha, gamma, beta, u_table, s, symmetric, out, v, seg, index, code=None) -> None:
    """``Q(x)`` in place: ``sgn(x)·α·u`` (``α·u`` unsigned; ``sgn(x)·α`` with ``sgn(0) = 1`` for ``s = 0``)."""
    if s == 0:
        torch.ge(x, 0, out=out).mul_(2.0).sub_(1.0).mul_(alpha)
        return
    _lcq_levels(x, alpha, gamma, beta, u_table, s, symmetric, out, v, seg, index, code)
    out.mul_(alpha)
    if symmetric:  # (sgn·α)·u = sgn·(α·u) exactly
        out.mul_(torch.sign(x, out=v))


def _lcq_terms(x, grad, alpha, code, tables, s, symmetric, grad_x, signed, u, w, v, index):
    """The per-element terms of the backward, in place; returns ``(signed, w)``.

    ``grad_x = grad·1{inside}``; ``signed = sgn(x)·grad`` (``grad`` itself when unsigned); ``u`` such that
    ``Q/α = sgn(x)·u`` (``u = sgn(x)`` and ``signed = grad`` for ``s = 0``). Companded (``code``: the
    forward's ``kx·(s + 1) + j``), ``index`` is that code, ``w = sgn(x)·grad·α`` inside the range and 0
    outside, and ``v = v − d_kx``; otherwise ``w`` is ``None``.
    """
    if symmetric:
        inside = torch.lt(torch.abs(x, out=v), alpha, out=w)
    else:  # 0 ≤ x < α
        inside = torch.ge(x, 0, out=w).mul_(torch.lt(x, alpha, out=v))
    torch.mul(grad, inside, out=grad_x)
    if s == 0:
        torch.ge(x, 0, out=u).mul_(2.0).sub_(1.0)
        return grad, None
    signed = torch.mul(grad, torch.sign(x, out=signed), out=signed) if symmetric else grad
    if code is None:
        _lcq_levels(x, alpha, None, None, None, s, symmetric, u, v, u, index)
        return signed, None
    u_by_code, d_by_code = tables  # g⁻¹(j/s) and d_kx, by code
    torch.abs(x, out=v) if symmetric else torch.clamp_min(x, 0.0, out=v)
    v.div_(alpha).clamp_(max=1.0).sub_(_gather(d_by_code, index.copy_(code), u))  # v − d_kx, as in the forward
    _gather(u_by_code, index, u)
    torch.mul(signed, w, out=w).mul_(alpha)
    return signed, w


class _LCQFunction(torch.autograd.Function):
    """Forward ``Q(x)``; backward the formulas of docs/design.md ("LCQ") for ``x``, ``α``, ``γ`` and ``β``.

    The rounded value ``y_q = j/s`` takes only ``s + 1`` values and the segment ``kx`` of ``|x|/α`` only
    ``K``: the forward saves both for every element as one small integer ``kx·(s + 1) + j``, besides ``x``
    (which the preceding layer keeps anyway). The compander gradients are then two scatter-adds over that
    code (of ``w = sgn·grad·α`` inside the range and of ``w·(v − d_kx)``), scaled per level by ``1/γ_kq``
    and summed per segment and per level on the ``K × (s + 1)`` table, instead of autograd through
    per-element gathers. The backward runs block by block so that its temporaries stay in cache, with float
    masks (bool tensors are slow on CPU) and ``index_select``/``scatter_add_`` on the small tables.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
        s: int, symmetric: bool,
    ) -> torch.Tensor:
        companded = gamma is not None and s > 0
        if not companded:
            gamma = beta = None
        ctx.tables = _level_tables(gamma, beta, s, x.dtype, x.device) if companded else None  # reused backward
        u_table = ctx.tables[2] if companded else None
        out = torch.empty_like(x)
        code, use_kernel = None, False
        if companded:
            combos = gamma.numel() * (s + 1)
            kernel_code = lcq_kernels.code_dtype(combos)
            use_kernel = alpha.numel() == 1 and kernels_enabled(
                lcq_kernels.kernel_name("forward", symmetric, kernel_code), x
            )
            small = torch.uint8 if combos <= 256 else torch.int16 if combos <= 2**15 else torch.int32
            code = torch.empty(x.shape, dtype=kernel_code if use_kernel else small, device=x.device)
        head = 0
        if use_kernel:
            head = lcq_kernels.lcq_forward(x, out, code, gamma, beta, u_table, float(alpha), s, symmetric)
        if head or elementwise_blocks(x, alpha):  # the rest of a contiguous tensor, in cached blocks
            rest = [t.view(-1)[head:] for t in (x, out, *([code] if companded else []))]
            scratch = block_scratch(2, x.numel() - head, x)
            int_scratch = block_scratch(1, x.numel() - head, x, torch.int32)
            for xb, outb, *code_b in split_blocks(*rest):
                v, seg = scratch(xb.numel())[1]
                _lcq_value(xb, alpha, gamma, beta, u_table, s, symmetric, outb, v, seg, int_scratch(xb.numel())[1][0],
                           code_b[0] if companded else None)
        else:
            v, seg = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device).unbind(0)
            index = torch.empty(x.shape, dtype=torch.int32, device=x.device)
            _lcq_value(x, alpha, gamma, beta, u_table, s, symmetric, out, v, seg, index, code)
        ctx.companded, ctx.symmetric, ctx.s = companded, symmetric, s
        ctx.save_for_backward(x, alpha, gamma, beta, code)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, alpha, gamma, beta, code = ctx.saved_tensors
        s, symmetric, companded = ctx.s, ctx.symmetric, ctx.companded
        tables = None
        if companded:
            k = gamma.numel()
            levels, kq, u_table = ctx.tables
            segments = torch.arange(k, dtype=x.dtype, device=x.device) / k  # d_k, as kx/K in the forward
            tables = (u_table.repeat(k), segments.repeat_interleave(s + 1))
            # per code: Σ w (row 0) and Σ w·(v − d_kx) (row 1)
            by_code = torch.zeros((2, k * (s + 1)), dtype=x.dtype, device=x.device)
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        head, kernel_sums = 0, None
        kernel = lcq_kernels.kernel_name("backward", symmetric, code.dtype) if companded else None
        if kernel is not None and alpha.numel() == 1 and kernels_enabled(kernel, x):
            head, kernel_sums, kernel_by_code = lcq_kernels.lcq_backward(
                x, grad, code, grad_x, *tables, float(alpha), symmetric
            )
            by_code += kernel_by_code.view(2, -1)
        if not (head or x.is_contiguous() and elementwise_blocks(grad, alpha)):
            signed, u, w, v = torch.empty((4, *x.shape), dtype=x.dtype, device=x.device).unbind(0)
            index = torch.empty(x.shape, dtype=torch.long, device=x.device)
            pieces = [(x, grad, grad_x, code)]
        else:  # the rest of a contiguous tensor, in cached blocks
            pieces = split_blocks(*(t.view(-1)[head:] for t in (x, grad, grad_x, *([code] if companded else []))))
            scratch = block_scratch(4, x.numel() - head, x)
            int_scratch = block_scratch(1, x.numel() - head, x, torch.long)
        sums = torch.empty((2, len(pieces)), dtype=x.dtype, device=x.device) if len(pieces) > 1 or head else None
        for i, (xb, gb, gxb, *code_b) in enumerate(pieces):
            if sums is not None:
                signed, u, w, v = scratch(xb.numel())[1]
                index = int_scratch(xb.numel())[1][0]
            signed, w = _lcq_terms(xb, gb, alpha, code_b[0] if companded else None, tables, s, symmetric, gxb,
                                   signed, u, w, v, index)
            if sums is None:  # ∂Q/∂α = Q/α − (x/α)·1{inside} = sgn·u − (x/α)·1{inside}
                sum_u = (signed * u).sum_to_size(alpha.shape)
                sum_x = (gxb * xb).sum_to_size(alpha.shape)
            else:
                torch.dot(signed, u, out=sums[0, i])
                torch.dot(gxb, xb, out=sums[1, i])
            if w is not None:
                flat_index = index.view(-1)
                by_code[0].scatter_add_(0, flat_index, w.view(-1))
                by_code[1].scatter_add_(0, flat_index, w.mul_(v).view(-1))
        if sums is not None:
            totals = sums.sum(1) if kernel_sums is None else sums.sum(1) + kernel_sums
            sum_u, sum_x = totals.reshape(2, *alpha.shape).unbind(0)
        grad_alpha = sum_u - sum_x / alpha if ctx.needs_input_grad[1] else None
        grad_gamma = grad_beta = None
        if companded and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            gq = gamma[kq]  # per level j
            w_table = (by_code / gq.repeat(k)).view(2, k, s + 1)  # the element weights w/γ_kq, summed per code
            per_level = w_table[0].sum(0)  # Σ w/γ_kq over each level j
            # ∂z/∂γ_k = sgn·α·[(v − d_kx)/γ_kq·1{k=kx} − (y_q − β_kq)/γ_kq²·1{k=kq}]
            grad_gamma = w_table[1].sum(1).index_add_(0, kq, -per_level * (levels - beta[kq]) / gq)
            # ∂z/∂β_k = sgn·α·(1/γ_kq)·(1{k=kx} − 1{k=kq})
            grad_beta = w_table[0].sum(1).index_add_(0, kq, -per_level)
        return grad_x, grad_alpha, grad_gamma, grad_beta, None, None


def lcq_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    s: int,
    symmetric: bool,
) -> torch.Tensor:
    """The training forward of LCQ with the gradients of docs/design.md, section "LCQ".

    ``gamma``/``beta`` ``None`` is the uniform quantizer (identity compander); ``s = 0`` is ``sgn(x)·α``.
    Unsigned mode clips negative inputs to 0. ``alpha`` broadcasts against ``x``.
    """
    return _LCQFunction.apply(x, alpha, gamma, beta, int(s), bool(symmetric))


@dataclass(frozen=True, eq=False)
class LCQOptions(QuantizerOptions):
    """``segments``: the compander's ``K`` equal input segments; ``weight_norm``: quantize weights divided by
    their standard deviation; ``grad_scale``: multiply α's gradient by ``1/sqrt(N·s)`` (as LSQ)."""

    segments: int = 16
    weight_norm: bool = True
    grad_scale: bool = True

    def check(self) -> None:
        if self.segments < 1:
            raise ConfigError(f"quantizer_options segments={self.segments!r} is invalid: expected a positive integer")


@register_quantizer("lcq")
class LCQQuantizer(Quantizer):
    """LCQ with a learned clip ``α`` (per channel for weights when configured) and compander ``θ`` per tensor."""

    options_class = LCQOptions
    options: LCQOptions

    def __init__(
        self, bits: int, role: Role, channels: int | None = None, options: LCQOptions | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(bits, role, channels, options)
        segments = self.options.segments
        per_channel = role == "weight" and bool(channels)
        self.alpha = nn.Parameter(torch.ones(self.num_params if per_channel else ()))
        add_flag(self, "signed", role == "weight")
        self.segments = int(segments)
        # θ exists only where it shapes the quantizer (not for 1/2-bit weights), so every parameter gets a gradient
        self.theta: nn.Parameter | None
        self.register_parameter("theta", nn.Parameter(torch.zeros(self.segments)) if self.companding else None)
        # the weight normaliser σ (per channel or per tensor), refreshed from every weight the quantizer sees
        self.register_buffer("norm", torch.ones(self.num_params if per_channel else ()))
        # LSQ's g = 1/sqrt(N·s) for α, fixed from the first tensor
        self.register_buffer("alpha_grad_scale", torch.tensor(1.0))

    # -- levels -----------------------------------------------------------------------------------------------

    @property
    def uniform(self) -> bool:
        return False

    @property
    def symmetric(self) -> bool:
        """Weights always; activations when their first batch had negative values."""
        return self.role == "weight" or read_flag(self, "signed")

    @property
    def s(self) -> int:
        """Positive levels besides zero: ``2^b − 1`` (unsigned) or ``2^(b−1) − 1`` (symmetric)."""
        return self.levels_for(self.symmetric)

    def levels_for(self, symmetric: bool) -> int:
        return 2 ** (self.bits - 1) - 1 if symmetric else 2**self.bits - 1

    @property
    def companding(self) -> bool:
        """False where the compander cannot change the quantizer: ``s ≤ 1`` weights (2-bit uniform, 1-bit sign)."""
        return not (self.role == "weight" and self.s <= 1)

    def _alpha(self) -> torch.Tensor:
        return self.alpha.abs().clamp_min(1e-8)

    def _compander(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return compander(self.theta) if self.theta is not None else (None, None)

    def unit_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, thresholds)`` of the quantizer for ``α = 1`` (before weight normalisation), sorted."""
        gamma, beta = self._compander()
        s = self.s
        if s == 0:
            return torch.tensor([-1.0, 1.0]), torch.tensor([0.0])
        j = torch.arange(0, s + 1, dtype=torch.float32)
        mids = (torch.arange(1, s + 1, dtype=torch.float32) - 0.5) / s
        if gamma is not None:
            with torch.no_grad():
                pos, cut = expand(j / s, gamma.detach(), beta.detach()), expand(mids, gamma.detach(), beta.detach())
        else:
            pos, cut = j / s, mids
        pos = pos.clamp(0.0, 1.0)
        pos[-1] = 1.0  # g⁻¹(1) = 1: the top level is exactly α, as the clipped branch of Q
        if not self.symmetric:
            return pos, cut
        return torch.cat([-pos.flip(0)[:-1], pos]), torch.cat([-cut.flip(0), cut])

    def grid(self) -> QuantGrid:
        unit, cuts = self.unit_levels()
        scale = (self._alpha() * self.norm).detach()
        if scale.dim():
            levels, thresholds = scale.unsqueeze(1) * unit, scale.unsqueeze(1) * cuts
        else:
            levels, thresholds = scale * unit, scale * cuts
        levels_int, int_scale = requantize_levels(levels)
        return QuantGrid(
            self.bits, "codebook", int_scale, torch.zeros_like(int_scale), levels, thresholds, levels_int=levels_int
        )

    # -- data -------------------------------------------------------------------------------------------------

    def _refresh_norm(self, x: torch.Tensor) -> None:
        if self.role != "weight" or not self.options.weight_norm:
            return
        with torch.no_grad():
            flat = x.detach().reshape(x.shape[0], -1) if self.channels else x.detach().reshape(1, -1)
            std = flat.float().std(dim=1, unbiased=False) if flat.shape[1] > 1 else flat.float().abs().amax(dim=1)
            self.norm.copy_(std.clamp_min(1e-8).reshape(self.norm.shape))

    def initialize(self, x: torch.Tensor) -> None:
        if self.role == "activation":
            write_flag(self, "signed", bool(x.min() < 0))
        self._refresh_norm(x)
        per_channel = self.role == "weight" and bool(self.channels)
        rows = (x / self.view(self.norm, x)).reshape(x.shape[0] if per_channel else 1, -1).float()
        mags = rows.abs() if self.symmetric else rows.clamp_min(0.0)
        if self.s == 0:
            alpha = mags.mean(dim=1)
        else:
            peak = mags.amax(dim=1).clamp_min(1e-8)
            best, best_err = peak.clone(), torch.full_like(peak, float("inf"))
            for frac in torch.linspace(1.0 / 32, 1.0, 32):
                a = (peak * frac).unsqueeze(1)
                q = torch.clamp(torch.floor(mags / a * self.s + 0.5), max=self.s) * a / self.s
                err = (q - mags).pow(2).mean(dim=1)
                better = err < best_err
                best, best_err = torch.where(better, a.squeeze(1), best), torch.where(better, err, best_err)
            alpha = best
        self.alpha.copy_(alpha.clamp_min(1e-8).reshape(self.alpha.shape))
        self.alpha_grad_scale.fill_(self.gradient_scale(x))

    # -- forward ----------------------------------------------------------------------------------------------

    def gradient_scale(self, x: torch.Tensor) -> float:
        if not self.options.grad_scale:
            return 1.0
        n = x.numel() // (self.channels or 1) if self.role == "weight" else (x[0].numel() if x.dim() > 1 else x.numel())
        return 1.0 / math.sqrt(max(n, 1) * max(self.s, 1))

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refresh_norm(x)
        gamma, beta = self._compander()
        alpha = self.view(grad_scale(self._alpha(), self.alpha_grad_scale), x)
        symmetric = self.symmetric  # read once: a data-dependent branch is a graph break under torch.compile
        s = self.levels_for(symmetric)
        if self.role == "weight" and self.options.weight_norm:
            norm = self.view(self.norm, x)
            return lcq_quantize(x / norm, alpha, gamma, beta, s, True) * norm
        return lcq_quantize(x, alpha, gamma, beta, s, symmetric)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        self._refresh_norm(x)
        grid = self.grid()
        return threshold_codes(x, grid.thresholds)

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.codes(x)
        return self.grid().dequantize(codes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segments={self.segments if self.theta is not None else 0}, s={self.s}"
