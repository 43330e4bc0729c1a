"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv 1902.08153).

The quantizer is ``x̂ = round(clip(x/s, −Q_N, Q_P)) · s`` (Eq. 1-2) with a learned step ``s``. Its gradient
treats rounding as the identity (straight-through), which gives the paper's step-size gradient (Eq. 3)::

    ∂x̂/∂s = −x/s + round(x/s)   if −Q_N < x/s < Q_P
          = −Q_N                 if x/s ≤ −Q_N
          = Q_P                  if x/s ≥ Q_P

and the step's gradient is multiplied by ``g = 1/sqrt(N·Q_P)`` (Section 2.2; ``N`` is the number of weights
sharing ``s``, or the number of features per example for activations). ``s`` starts at
``2·mean|x| / sqrt(Q_P)`` on the first weights or batch.

Grids: weights are signed, ``[−2^(b−1), 2^(b−1)−1]`` (encoding ``"signed"``), per channel when configured.
Activations are unsigned ``[0, 2^b−1]``. Our designs where the paper is silent:

- 1-bit weights use the symmetric pair ``±s`` (encoding ``"bipolar"``; a 1-bit two's-complement grid would be
  ``{−s, 0}``), with ``Q_N = Q_P = 1`` in the formulas above and ``s`` initialised to ``mean|x|`` (the
  L2-optimal binary scale; ``2·mean|x|/sqrt(1)`` would clip nothing and double the error).
- Activations whose first batch holds negative values (e.g. a normalised image feeding the first layer)
  use the same signed grid as weights (zero-centred, no offset to learn), fixed at initialisation.
- Rounding is half-up (``floor(v + ½)``), the convention of the integer reference, so that the training
  forward value and the frozen graph agree on ties.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxquant.quantizers.base import (
    BinaryScale,
    Quantizer,
    Role,
    add_flag,
    block_scratch,
    elementwise_blocks,
    read_flag,
    split_blocks,
    write_flag,
)
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import register_quantizer

__all__ = ["LSQQuantizer", "LSQOptions", "lsq_quantize", "grad_scale"]


def grad_scale(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (LSQ Section 2.2)."""
    y = x * scale
    return (x - y).detach() + y


def _lsq_hard(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, out: torch.Tensor) -> None:
    """``out = floor(clip(x/s, −Q_N, Q_P) + ½)·s`` in place: the value of ``((q − v).detach() + v)·s``."""
    torch.div(x, step, out=out).clamp_(-qn, qp).add_(0.5).floor_().mul_(step)


def _lsq_terms(x, grad, step, qn, qp, grad_x, v, d_step) -> None:
    """``grad_x = grad·1{−Q_N < x/s < Q_P}`` and ``d_step = ∂x̂/∂s`` (Eq. 3), in place; ``v`` is scratch.

    The open range is that of autograd's clamp; ``hardtanh_backward`` masks with it in one pass and
    without a bool tensor (slow on CPU).
    """
    torch.div(x, step, out=v)
    torch.ops.aten.hardtanh_backward.grad_input(grad, v, -qn, qp, grad_input=grad_x)
    torch.clamp(v, -qn, qp, out=d_step).add_(0.5).floor_()
    # round(clip(v)) − v inside the range, the bound outside
    d_step.sub_(torch.ops.aten.hardtanh_backward.grad_input(v, v, -qn, qp, grad_input=v))


class _LSQFunction(torch.autograd.Function):
    """``round(clip(x/s, −Q_N, Q_P))·s`` with the straight-through gradients of Eq. 3, fused.

    Autograd through the division, clamp and straight-through round makes about a dozen passes over
    every feature map; this forward makes one chain of in-place passes and saves only ``x`` (which the
    preceding layer keeps anyway), and the backward recomputes the two per-element terms block by block
    so that they stay in cache. ``∂x̂/∂x`` is exactly the indicator of the open clip range.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
        out = torch.empty_like(x)
        if elementwise_blocks(x, step):
            for xb, outb in split_blocks(x, out):
                _lsq_hard(xb, step, qn, qp, outb)
        else:
            _lsq_hard(x, step, qn, qp, out)
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp = qn, qp
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, step = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        if not (x.is_contiguous() and elementwise_blocks(grad, step)):
            v, d_step = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device).unbind(0)
            _lsq_terms(x, grad, step, ctx.qn, ctx.qp, grad_x, v, d_step)
            grad_step = (grad * d_step).sum_to_size(step.shape)
        else:
            pieces = split_blocks(x, grad, grad_x)
            scratch = block_scratch(2, x.numel(), x)
            partial = torch.empty(len(pieces), dtype=x.dtype, device=x.device)
            partial_out = partial.unbind(0)
            for j, (xb, gb, gxb) in enumerate(pieces):
                v, d_step = scratch(xb.numel())[1]
                _lsq_terms(xb, gb, step, ctx.qn, ctx.qp, gxb, v, d_step)
                torch.dot(gb, d_step, out=partial_out[j])
            grad_step = partial.sum().reshape(step.shape)
        return grad_x, grad_step if ctx.needs_input_grad[1] else None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, bipolar: bool = False) -> torch.Tensor:
    """``round(clip(x/s, −Q_N, Q_P))·s`` with a straight-through round (Eq. 1-3); ``bipolar`` gives ``±s``."""
    if not bipolar:
        return _LSQFunction.apply(x, step, int(qn), int(qp))
    v = x / step
    vc = torch.clamp(v, -1.0, 1.0)
    q = torch.where(vc >= 0, torch.ones_like(vc), -torch.ones_like(vc))
    return ((q - vc).detach() + vc) * step


def _unit_sign(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``±1`` by the sign of ``x`` (``sgn 0 = +1``), straight through with slope ``1/window`` (``|x| ≤ window``)."""
    v = x / window
    return (torch.where(v >= 0, 1.0, -1.0) - v).detach() + v


@dataclass(frozen=True, eq=False)
class LSQOptions(QuantizerOptions):
    """``grad_scale``: multiply the step's gradient by ``1/sqrt(N·Q_P)``; ``binary_scale``: the scale of 1-bit
    weights."""

    grad_scale: bool = True
    binary_scale: BinaryScale = "mean"


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """LSQ with one learned step per tensor (activations) or per output channel (weights, when configured)."""

    options_class = LSQOptions
    options: LSQOptions

    def __init__(
        self, bits: int, role: Role, channels: int | None = None, options: LSQOptions | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(bits, role, channels, options)
        self.step = nn.Parameter(torch.ones(self.num_params if (role == "weight" and channels) else ()))
        add_flag(self, "signed", role == "weight")
        # g = 1/sqrt(N·Q_P), fixed from the first tensor (a buffer, so compiled graphs see no symbolic shapes)
        self.register_buffer("step_grad_scale", torch.tensor(1.0))
        self._register_binary_scale()

    # -- grid ---------------------------------------------------------------------------------------------

    def is_signed(self) -> bool:
        """Weights always; activations when their first batch had negative values."""
        return self.role == "weight" or read_flag(self, "signed")

    @property
    def bipolar(self) -> bool:
        return self.bits == 1 and self.is_signed()

    def bounds(self, signed: bool | None = None) -> tuple[int, int]:
        """``(Q_N, Q_P)``: the number of negative and positive levels."""
        signed = self.is_signed() if signed is None else signed
        if signed and self.bits == 1:
            return 1, 1
        if signed:
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def _step(self) -> torch.Tensor:
        return self.step.abs().clamp_min(1e-8)

    def grid(self) -> QuantGrid:
        if self.binary_mean_scale:
            return QuantGrid(1, "bipolar", self.binary_scale, torch.zeros_like(self.binary_scale))
        s = self._step()
        signed = self.is_signed()
        encoding = ("bipolar" if self.bits == 1 else "signed") if signed else "unsigned"
        return QuantGrid(self.bits, encoding, s, torch.zeros_like(s))

    # -- data ---------------------------------------------------------------------------------------------

    def initialize(self, x: torch.Tensor) -> None:
        if self.role == "activation":
            write_flag(self, "signed", bool(x.min() < 0))
        _, qp = self.bounds()
        per_channel = self.role == "weight" and bool(self.channels)
        mean_abs = x.abs().reshape(x.shape[0], -1).mean(dim=1) if per_channel else x.abs().mean()
        factor = 1.0 if self.bipolar else 2.0 / math.sqrt(qp)
        self.step.copy_((mean_abs * factor).clamp_min(1e-8).reshape(self.step.shape))
        self.step_grad_scale.fill_(self.gradient_scale(x))
        self.track_weight(x)

    def gradient_scale(self, x: torch.Tensor) -> float:
        """``g = 1/sqrt(N·Q_P)``: ``N`` = elements per step (weights) or features per example (activations)."""
        if not self.options.grad_scale:
            return 1.0
        _, qp = self.bounds()
        if self.role == "weight":
            n = x.numel() // (self.channels or 1)
        else:
            n = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * qp)

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_mean_scale:  # the learned step is unused (kept in the graph with a zero gradient for DDP)
            return self.binary_forward(x, _unit_sign) + self.step.sum() * 0.0
        signed = self.is_signed()  # read once: a data-dependent branch is a graph break under torch.compile
        qn, qp = self.bounds(signed)
        s = self.view(grad_scale(self._step(), self.step_grad_scale), x)
        return lsq_quantize(x, s, qn, qp, bipolar=signed and self.bits == 1)
