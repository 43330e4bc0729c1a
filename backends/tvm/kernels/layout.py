"""Bit-packed layouts shared by the packers and every target's kernel.

Weights (built once by :func:`pack_weights_array`) are ``uint64`` words; bit ``k`` of a word is one bit-plane of
the code of input channel ``64 * word + k``:

* convolution: ``(O_blocks, KH, KW, weight_bits, words, OC_BLOCK)``
* dense:       ``(O_blocks, weight_bits, words, OC_BLOCK)``

with ``O_blocks = ceil(O / OC_BLOCK)`` and ``OC_BLOCK = 8`` output channels innermost, so one 256-bit (AVX2) or two
128-bit (NEON) loads fetch the same word for 4 or 2 output channels. Missing channels (``C`` not a multiple of 64,
``words`` rounded up to split evenly into chunks) and missing output channels are zero bits.

Kernels count bits per byte and sum at most :data:`MAX_CHUNK` words into 8-bit lanes before widening: a byte of
``popcount(a & w)`` is at most 8, and ``31 * 8 = 248`` still fits a byte. ``padded_words`` keeps every chunk the
same length so kernels need no tail loop.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WORD_BITS", "OC_BLOCK", "MAX_CHUNK", "words_for", "padded_words", "oc_blocks", "pack_weights_array"]

WORD_BITS = 64
OC_BLOCK = 8
MAX_CHUNK = 31


def words_for(channels: int) -> int:
    """Number of 64-bit words that hold ``channels`` bits."""
    return -(-channels // WORD_BITS)


def padded_words(channels: int) -> int:
    """Words per pixel after padding, so that the words split into equal chunks of at most ``MAX_CHUNK``."""
    words = words_for(channels)
    if words <= MAX_CHUNK:
        return words
    chunks = -(-words // MAX_CHUNK)
    return chunks * -(-words // chunks)


def oc_blocks(out_channels: int) -> int:
    return -(-out_channels // OC_BLOCK)


def pack_weights_array(codes: np.ndarray, weight_bits: int) -> np.ndarray:
    """Pack ``(O, C, KH, KW)`` (or ``(O, C)``) uint8 codes into the layout documented above."""
    codes = np.asarray(codes)
    dense = codes.ndim == 2
    if dense:
        codes = codes[:, :, None, None]
    if codes.ndim != 4:
        raise ValueError(f"expected (O, C, KH, KW) or (O, C) weight codes, got shape {codes.shape}")
    out_c, in_c, kh, kw = codes.shape
    words = padded_words(in_c)
    blocks = oc_blocks(out_c)
    full = np.zeros((blocks * OC_BLOCK, words * WORD_BITS, kh, kw), dtype=np.uint8)
    full[:out_c, :in_c] = codes.astype(np.uint8)
    # planes: (WB, O, C, KH, KW) of 0/1 bits.
    planes = (full[None] >> np.arange(weight_bits, dtype=np.uint8)[:, None, None, None, None]) & 1
    # -> (WB, O, words, 64, KH, KW); packbits little-endian along the 64 channel bits gives 8 bytes per word.
    planes = planes.reshape(weight_bits, blocks * OC_BLOCK, words, WORD_BITS, kh, kw)
    planes = np.moveaxis(planes, 3, -1)  # (WB, O, words, KH, KW, 64)
    packed = np.packbits(planes, axis=-1, bitorder="little")  # (WB, O, words, KH, KW, 8) bytes
    packed = np.ascontiguousarray(packed).view("<u8")[..., 0]  # (WB, O, words, KH, KW)
    packed = packed.reshape(weight_bits, blocks, OC_BLOCK, words, kh, kw)
    packed = packed.transpose(1, 4, 5, 0, 3, 2)  # (blocks, KH, KW, WB, words, OC_BLOCK)
    packed = np.ascontiguousarray(packed).astype(np.uint64)
    return packed[:, 0, 0] if dense else packed
