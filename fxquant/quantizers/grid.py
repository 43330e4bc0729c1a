"""The hard form of a quantizer: integer codes plus the numbers that give them a real value.

A code ``c`` in ``[0, 2**bits - 1]`` has the integer value ``mult * c + zero`` where (mult, zero) depend on
the encoding, and the real value ``offset + scale * int_value``:

- ``bipolar``:  int = 2c - (2**b - 1)   (odd integers, no zero; the bit-serial weight encoding)
- ``signed``:   int = c - 2**(b-1)      (two's-complement range, zero included)
- ``unsigned``: int = c                 (the bit-serial activation encoding)
- ``codebook``: real = levels[c]        (non-uniform; deployed as a lookup table)

Codes come either from rounding on the uniform grid or, for non-uniform thresholds, from comparisons.
Both the prepared model's hard forward and the frozen integer graph call :func:`uniform_codes` on the
same float32 tensors, so their codes agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["QuantGrid", "Encoding", "uniform_codes", "threshold_codes", "channel_view", "ENCODINGS"]

Encoding = Literal["bipolar", "signed", "unsigned", "codebook"]
ENCODINGS = ("bipolar", "signed", "unsigned", "codebook")


def encoding_mult_zero(encoding: str, bits: int) -> tuple[int, int]:
    n = 2**bits - 1
    return {"bipolar": (2, -n), "signed": (1, -(2 ** (bits - 1))), "unsigned": (1, 0)}[encoding]


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
    return torch.clamp(torch.floor((x - low) / step + 0.5), 0, 2**bits - 1)


def threshold_codes(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Codes as the number of (sorted) thresholds that ``x`` reaches: a staircase with arbitrary steps."""
    return torch.bucketize(x, thresholds, right=True).to(x.dtype)


@dataclass(frozen=True, eq=False)
class QuantGrid:
    """What ``freeze`` needs to turn a quantizer into integer arithmetic.

    ``scale`` and ``offset`` are float32 tensors (per-channel along axis 0 for weights, scalars for
    activations). ``levels`` holds the codebook values for ``encoding == "codebook"``; ``thresholds``
    the code boundaries of a threshold-based (non-uniform) activation quantizer.
    """

    bits: int
    encoding: Encoding
    scale: torch.Tensor
    offset: torch.Tensor
    levels: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None

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

    def int_values(self, codes: torch.Tensor) -> torch.Tensor:
        mult, zero = self.mult_zero
        return codes.to(torch.int64) * mult + zero

    def codes(self, x: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """Integer codes of ``x`` (as float tensor of whole numbers) under this grid."""
        if self.thresholds is not None:
            return threshold_codes(x, self.thresholds)
        if self.encoding == "codebook":
            raise NotImplementedError("codebook grids produce codes through their quantizer")
        return uniform_codes(x, channel_view(self.low, x, axis), channel_view(self.step, x, axis), self.bits)

    def dequantize(self, codes: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """Real values of ``codes``; the prepared model's hard forward uses exactly this."""
        if self.encoding == "codebook":
            assert self.levels is not None
            if self.levels.dim() == 1:
                return self.levels[codes.long()]
            idx = codes.long().movedim(axis, 0).reshape(codes.shape[axis], -1)
            vals = torch.gather(self.levels, 1, idx).reshape(codes.movedim(axis, 0).shape)
            return vals.movedim(0, axis)
        return channel_view(self.low, codes, axis) + channel_view(self.step, codes, axis) * codes
