"""Static shape facts of one bit-serial layer call, derived once and shared by every kernel builder.

Sizes and padding come from :mod:`fxquant.conv_geometry` (:meth:`BitserialGeometry.of`); what is added here is
the bit-serial view: bit-widths, the weight encoding, and the packed layout's words and output-channel blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.conv_geometry import ConvGeometry, output_size

from .layout import MAX_CHUNK, OC_BLOCK, oc_blocks, padded_words, words_for

__all__ = ["BitserialGeometry"]


@dataclass(frozen=True)
class BitserialGeometry:
    """A convolution (dense is the 1x1, 1x1-image case) with its bit-widths and packed-layout sizes."""

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

    @classmethod
    def of(cls, conv: ConvGeometry, act_bits: int, weight_bits: int, bipolar: bool,
           dense: bool = False) -> BitserialGeometry:
        """The bit-serial view of a resolved ``groups == 1`` convolution."""
        return cls(
            batch=conv.batch, in_channels=conv.in_channels, in_h=conv.height, in_w=conv.width,
            out_channels=conv.out_channels, kernel_h=conv.kernel[0], kernel_w=conv.kernel[1], stride=conv.stride,
            dilation=conv.dilation, pad=conv.padding, act_bits=act_bits, weight_bits=weight_bits, bipolar=bipolar,
            dense=dense,
        )

    @property
    def out_h(self) -> int:
        return output_size(self.in_h, self.kernel_h, self.stride[0], self.pad[0], self.pad[2], self.dilation[0])

    @property
    def out_w(self) -> int:
        return output_size(self.in_w, self.kernel_w, self.stride[1], self.pad[1], self.pad[3], self.dilation[1])

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
