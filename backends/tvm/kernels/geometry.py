"""Static shape facts of one bit-serial layer call, derived once and shared by every kernel builder."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import MAX_CHUNK, OC_BLOCK, oc_blocks, padded_words, words_for

__all__ = ["ConvGeometry", "resolve_padding"]


def resolve_padding(
    padding: str | tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from PyTorch's conv padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            total_h = dilation[0] * (kernel[0] - 1)
            total_w = dilation[1] * (kernel[1] - 1)
            return total_h // 2, total_w // 2, total_h - total_h // 2, total_w - total_w // 2
        raise ValueError(f"unknown padding mode {padding!r}")
    ph, pw = (int(p) for p in padding)
    return ph, pw, ph, pw


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution (dense is the 1x1, 1x1-image case) with its packed-layout sizes."""

    batch: int
    in_channels: int
    in_h: int
    in_w: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    act_bits: int
    weight_bits: int
    bipolar: bool
    dense: bool = False

    @property
    def out_h(self) -> int:
        span = self.dilation[0] * (self.kernel_h - 1) + 1
        return (self.in_h + self.pad[0] + self.pad[2] - span) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        span = self.dilation[1] * (self.kernel_w - 1) + 1
        return (self.in_w + self.pad[1] + self.pad[3] - span) // self.stride[1] + 1

    @property
    def padded_h(self) -> int:
        return self.in_h + self.pad[0] + self.pad[2]

    @property
    def padded_w(self) -> int:
        return self.in_w + self.pad[1] + self.pad[3]

    @property
    def words(self) -> int:
        """Words that carry real channels."""
        return words_for(self.in_channels)

    @property
    def padded_words(self) -> int:
        return padded_words(self.in_channels)

    @property
    def oc_blocks(self) -> int:
        return oc_blocks(self.out_channels)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.dense:
            return (self.oc_blocks, self.weight_bits, self.padded_words, OC_BLOCK)
        return (self.oc_blocks, self.kernel_h, self.kernel_w, self.weight_bits, self.padded_words, OC_BLOCK)

    @property
    def codes_shape(self) -> tuple[int, ...]:
        if self.dense:
            return (self.batch, self.in_channels)
        return (self.batch, self.in_channels, self.in_h, self.in_w)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.dense:
            return (self.batch, self.out_channels)
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def bit_ops(self) -> int:
        """One-bit multiply-accumulates the layer performs (its MACs times the bit-plane pairs)."""
        pixels = self.batch * self.out_h * self.out_w
        macs = pixels * self.out_channels * self.in_channels * self.kernel_h * self.kernel_w
        return macs * self.act_bits * self.weight_bits

    def reduction_dims(self) -> tuple[tuple[int, int, int, int], int]:
        """The reduction as loops ``(kh, kw, word_outer, word_inner)`` and how many lead dims are chunk loops.

        Loops after the split form one chunk: at most ``MAX_CHUNK`` words summed in 8-bit lanes before widening.
        """
        words = self.padded_words
        if self.kernel_h * self.kernel_w * words <= MAX_CHUNK:
            return (self.kernel_h, self.kernel_w, 1, words), 0
        if self.kernel_w * words <= MAX_CHUNK:
            return (self.kernel_h, self.kernel_w, 1, words), 1
        if words <= MAX_CHUNK:
            return (self.kernel_h, self.kernel_w, 1, words), 2
        per = words // -(-words // MAX_CHUNK)
        return (self.kernel_h, self.kernel_w, words // per, per), 3
