"""The hard form of a quantizer: integer codes plus the numbers that give them a real value.

A code ``c`` in ``[0, 2**bits - 1]`` has the integer value ``mult * c + zero`` where (mult, zero) depend on
the encoding, and the real value ``offset + scale * int_value``:

- ``bipolar``:  int = 2c - (2**b - 1)   (odd integers, no zero; the bit-serial weight encoding)
- ``signed``:   int = c - 2**(b-1)      (two's-complement range, zero included)
- ``unsigned``: int = c                 (the bit-serial activation encoding)
- ``codebook``: real = levels[c]        (non-uniform; deployed as a lookup table)

A codebook grid also carries ``levels_int``, the levels requantized to 8-bit integers with its ``scale``
(``levels ≈ scale * levels_int``, see :func:`requantize_levels`): that lookup table is what the integer
arithmetic uses, so the integer value of code ``c`` is ``levels_int[c]`` (``mult = 1, zero = 0``).

Codes come either from rounding on the uniform grid or, for non-uniform thresholds, from comparisons.
Both the prepared model's hard forward and the frozen integer graph call :func:`uniform_codes` on the
same float32 tensors, so their codes agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "QuantGrid",
    "Encoding",
    "uniform_codes",
    "threshold_codes",
    "channel_view",
    "requantize_levels",
    "level_codes",
    "ENCODINGS",
]

Encoding = Literal["bipolar", "signed", "unsigned", "codebook"]
ENCODINGS = ("bipolar", "signed", "unsigned", "codebook")


def encoding_mult_zero(encoding: str, bits: int) -> tuple[int, int]:
    n = 2**bits - 1
    return {"bipolar": (2, -n), "signed": (1, -(2 ** (bits - 1))), "unsigned": (1, 0), "codebook": (1, 0)}[encoding]


def channel_view(t: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel vector (or a scalar) so that it broadcasts along ``axis`` of ``like``."""
    if t.dim() == 0 or t.numel() == 1 and like.dim() == 0:
        return t.reshape(())
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = t.numel()
    return t.reshape(shape)


def uniform_codes(x: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-half-up codes on the grid ``low + step * c``; ties go up so that 0.5 steps are deterministic."""
    diff = x - low
    if not _in_place_ok(diff, step):
        return torch.clamp(torch.floor(diff / step + 0.5), 0, 2**bits - 1)
    # the same operations in place on the one temporary (freeze and the eval forward run this on every weight)
    return diff.div_(step).add_(0.5).floor_().clamp_(0, 2**bits - 1)


def _in_place_ok(t: torch.Tensor, other: torch.Tensor | float) -> bool:
    """Whether ``t.div_(other)`` etc. give what ``t / other`` would: no autograd, same dtype and shape."""
    if torch.is_grad_enabled() and (t.requires_grad or isinstance(other, torch.Tensor) and other.requires_grad):
        return False
    if not t.is_floating_point() or torch.result_type(t, other) != t.dtype:
        return False
    return not isinstance(other, torch.Tensor) or torch.broadcast_shapes(t.shape, other.shape) == t.shape


def threshold_codes(x: torch.Tensor, thresholds: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Codes as the number of (sorted) thresholds that ``x`` reaches: a staircase with arbitrary steps.

    ``thresholds`` is 1-D (shared) or 2-D ``(channels, n)``: one sorted row per channel along ``axis``.
    """
    if thresholds.dim() <= 1:
        return torch.bucketize(x, thresholds, right=True).to(x.dtype)
    codes = torch.zeros_like(x)
    for i in range(thresholds.shape[1]):
        codes = codes + (x >= channel_view(thresholds[:, i], x, axis)).to(x.dtype)
    return codes


def requantize_levels(levels: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer lookup values and scale of codebook ``levels`` (1-D, or 2-D with one row per channel).

    ``scale = max|level| / qmax`` per row and ``levels_int = round(level / scale)``, with ``qmax = 2**bits - 1``
    when every level of the tensor is non-negative (an unsigned table) and ``2**(bits-1) - 1`` otherwise
    (a symmetric signed table), so that ``levels ≈ scale * levels_int`` with integer arithmetic downstream.
    """
    lv = levels.detach().float()
    qmax = 2**bits - 1 if bool((lv >= 0).all()) else 2 ** (bits - 1) - 1
    peak = lv.abs().amax(dim=-1) if lv.dim() > 1 else lv.abs().amax()
    scale = (peak / qmax).clamp_min(1e-12)
    ints = torch.clamp(torch.floor(lv / scale.unsqueeze(-1) + 0.5) if lv.dim() > 1 else torch.floor(lv / scale + 0.5),
                       -qmax, qmax)
    return ints.to(torch.int64), scale


def level_codes(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes of values that lie on the sorted 1-D ``levels`` (the nearest level; used to recover codes)."""
    mids = (levels[1:] + levels[:-1]) * 0.5
    return torch.bucketize(x, mids.to(x.dtype), right=True).to(x.dtype)


@dataclass(frozen=True, eq=False)
class QuantGrid:
    """What ``freeze`` needs to turn a quantizer into integer arithmetic.

    ``scale`` and ``offset`` are float32 tensors (per-channel along axis 0 for weights, scalars for
    activations). ``levels`` holds the codebook values for ``encoding == "codebook"`` (1-D, or
    ``(channels, codes)``), and ``levels_int`` their integer lookup values (real ≈ ``scale * levels_int``);
    ``thresholds`` the code boundaries of a threshold-based quantizer, in input units (sorted; 1-D, or
    ``(channels, n)`` for per-channel weights).
    """

    bits: int
    encoding: Encoding
    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    levels_int: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return self.encoding != "codebook"

    @property
    def mult_zero(self) -> tuple[int, int]:
        return encoding_mult_zero(self.encoding, self.bits)

    @property
    def step(self) -> torch.Tensor:
        return self.scale * self.mult_zero[0]

    @property
    def low(self) -> torch.Tensor:
        return self.offset + self.scale * self.mult_zero[1]

    def int_values(self, codes: torch.Tensor, axis: int = 0) -> torch.Tensor:
        if self.encoding == "codebook":
            if self.levels_int is None:
                raise ValueError("a codebook grid needs levels_int to give integer values")
            return _lookup(self.levels_int, codes, axis)
        mult, zero = self.mult_zero
        return codes.to(torch.int64).mul_(mult).add_(zero)  # in place: weights can have 100M entries

    def codes(self, x: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """Integer codes of ``x`` (as float tensor of whole numbers) under this grid."""
        if self.thresholds is not None:
            return threshold_codes(x, self.thresholds, axis)
        if self.encoding == "codebook":
            raise NotImplementedError("codebook grids produce codes through their quantizer")
        return uniform_codes(x, channel_view(self.low, x, axis), channel_view(self.step, x, axis), self.bits)

    def dequantize(self, codes: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """Real values of ``codes``; the prepared model's hard forward uses exactly this."""
        if self.encoding == "codebook":
            assert self.levels is not None
            return _lookup(self.levels, codes, axis)
        return channel_view(self.low, codes, axis) + channel_view(self.step, codes, axis) * codes


def _lookup(table: torch.Tensor, codes: torch.Tensor, axis: int) -> torch.Tensor:
    """``table[codes]`` for a 1-D table, or row ``k`` of a 2-D table for channel ``k`` along ``axis``."""
    if table.dim() == 1:
        return table[codes.long()]
    idx = codes.long().movedim(axis, 0).reshape(codes.shape[axis], -1)
    vals = torch.gather(table, 1, idx).reshape(codes.movedim(axis, 0).shape)
    return vals.movedim(0, axis)
