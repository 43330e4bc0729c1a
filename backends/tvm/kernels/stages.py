"""TIR stages every target's bit-serial kernel shares, emitted with the TVMScript IR builder.

* :func:`emit_activation_pack`: int32 NCHW codes -> zero-padded bit planes ``(N, AB, Hp, words, halves, Wp)`` of
  ``uint64`` words, vectorized along the image row (contiguous in NCHW). With ``halves == 2`` the word is split
  into its low and high nibbles (``half 1`` holds bits 4..7 of every byte shifted down by 4) so that an AVX2
  kernel can look popcounts up with one byte shuffle per nibble and no masking.
* :func:`emit_window_sums`: ``-(2^wb - 1) * sum(activation codes over the window)`` per output pixel, the whole
  correction that turns an unsigned-weight accumulator into a bipolar one (``w = 2c - n``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .geometry import ConvGeometry
from .layout import WORD_BITS

__all__ = [
    "PACK_LANES",
    "vconst",
    "ramp",
    "codes_loader",
    "out_index",
    "emit_activation_pack",
    "emit_window_sums",
]

PACK_LANES = 8  # image pixels packed per vector: eight int32 codes are one 256-bit load

Index = tirx.Expr | int


def vconst(value: int, dtype: str, lanes: int) -> tirx.Expr:
    """A constant in every lane (a scalar when ``lanes == 1``)."""
    return tirx.Broadcast(tirx.const(value, dtype), lanes) if lanes > 1 else tirx.const(value, dtype)


def ramp(base: Index, lanes: int) -> Index:
    """Index of ``lanes`` consecutive elements from ``base`` (``base`` itself when ``lanes == 1``)."""
    return tirx.Ramp(base, 1, lanes) if lanes > 1 else base


def codes_loader(geom: ConvGeometry, codes: tirx.Buffer) -> Callable[[Index, Index, Index, Index], tirx.Expr]:
    """(n, c, h, w_index) -> load; dense layers are a 1x1 image with the features as channels."""
    if geom.dense:
        return lambda n, c, h, w: codes[n, c]
    return lambda n, c, h, w: codes[n, c, h, w]


def out_index(geom: ConvGeometry, n: Index, o: Index, oh: Index, ow: Index) -> list[Index]:
    return [n, o] if geom.dense else [n, o, oh, ow]


def _bit_positions(halves: int, half: int) -> list[tuple[int, int]]:
    """(bit position in the stored word, channel within the 64-channel word) pairs for one stored half."""
    if halves == 1:
        return [(k, k) for k in range(WORD_BITS)]
    return [(k, k + 4 * half) for k in range(WORD_BITS) if k % 8 < 4]


def _pack_word(
    load: Callable[[Index, Index, Index, Index], tirx.Expr],
    n: Index,
    h: Index,
    w0: Index,
    lanes: int,
    channel0: Index,
    channels: int,
    ab: int,
    positions: Sequence[tuple[int, int]],
) -> tirx.Expr:
    """One uint64 word (per lane) OR-ed together in two 32-bit halves: shifts stay in 32-bit lanes."""
    u32 = f"uint32x{lanes}" if lanes > 1 else "uint32"
    u64 = f"uint64x{lanes}" if lanes > 1 else "uint64"
    parts: list[tirx.Expr | None] = [None, None]
    for pos, ch in positions:
        if ch >= channels:
            continue
        x = tirx.Cast(u32, load(n, channel0 + ch, h, ramp(w0, lanes)))
        at = pos % 32
        if at >= ab:  # mask first: no set bit is ever shifted out
            term = (x & vconst(1 << ab, "uint32", lanes)) << vconst(at - ab, "uint32", lanes)
        else:
            term = (x >> vconst(ab - at, "uint32", lanes)) & vconst(1 << at, "uint32", lanes)
        slot = pos // 32
        parts[slot] = term if parts[slot] is None else parts[slot] | term
    word = vconst(0, "uint64", lanes)
    if parts[0] is not None:
        word = tirx.Cast(u64, parts[0])
    if parts[1] is not None:
        word = word | (tirx.Cast(u64, parts[1]) << vconst(32, "uint64", lanes))
    return word


def emit_activation_pack(geom: ConvGeometry, codes: tirx.Buffer, halves: int) -> tirx.Buffer:
    """Allocate and fill the packed, zero-padded activation planes; returns the buffer.

    Parallel over (batch, padded row). Pad rows, pad columns and pad words are stored as zeros, so the main loop
    reads any window without bounds checks, and zero bits add nothing to either popcount term.
    """
    n_, ab_n, hp_n, wp_n = geom.batch, geom.act_bits, geom.padded_h, geom.padded_w
    words, pwords = geom.words, geom.padded_words
    top, left = geom.pad[0], geom.pad[1]
    apk = T.alloc_buffer((n_, ab_n, hp_n, pwords, halves, wp_n), "uint64")
    load = codes_loader(geom, codes)
    full_words, rem = divmod(geom.in_channels, WORD_BITS)

    def zero(n: Index, ab: int, hp: Index, cw: Index, half: int, start: int, stop: int) -> None:
        if stop > start:
            T.buffer_store(apk, vconst(0, "uint64", stop - start), [n, ab, hp, cw, half, ramp(start, stop - start)])

    def block(
        n: Index, ab: int, hp: Index, h: Index, cw: Index, half: int, w0: Index, lanes: int, channels: int
    ) -> None:
        positions = _bit_positions(halves, half)
        word = _pack_word(load, n, h, w0, lanes, cw * WORD_BITS, channels, ab, positions)
        T.buffer_store(apk, word, [n, ab, hp, cw, half, ramp(left + w0, lanes)])

    def row(n: Index, ab: int, hp: Index, h: Index, cw: Index, channels: int) -> None:
        blocks, tail = divmod(geom.in_w, PACK_LANES)
        for half in range(halves):
            zero(n, ab, hp, cw, half, 0, left)
            zero(n, ab, hp, cw, half, left + geom.in_w, wp_n)
            if blocks:
                with T.serial(0, blocks) as wb:
                    block(n, ab, hp, h, cw, half, wb * PACK_LANES, PACK_LANES, channels)
            if tail:
                block(n, ab, hp, h, cw, half, blocks * PACK_LANES, tail, channels)

    with T.parallel(0, n_ * hp_n) as nh:
        n = nh // hp_n
        hp = nh % hp_n
        h = hp - top
        inside = tirx.all(hp >= top, hp < top + geom.in_h)
        for ab in range(ab_n):
            with T.If(inside):
                with T.Then():
                    if full_words:
                        with T.serial(0, full_words) as cw:
                            row(n, ab, hp, h, cw, WORD_BITS)
                    if rem:
                        row(n, ab, hp, h, full_words, rem)
                    for cw in range(words, pwords):
                        for half in range(halves):
                            zero(n, ab, hp, cw, half, 0, wp_n)
                with T.Else():
                    with T.serial(0, pwords) as cw:
                        for half in range(halves):
                            zero(n, ab, hp, cw, half, 0, wp_n)
    return apk


def emit_window_sums(geom: ConvGeometry, apk: tirx.Buffer) -> tirx.Buffer:
    """``wsum[n, oh, ow] = -(2^wb - 1) * sum of activation codes in the window`` (int32)."""
    oh_n, ow_n = geom.out_h, geom.out_w
    sh, sw = geom.stride
    dh, dw = geom.dilation
    halves = int(apk.shape[4])
    scale = -((1 << geom.weight_bits) - 1)
    wsum = T.alloc_buffer((geom.batch, oh_n, ow_n), "int32")
    with T.parallel(0, geom.batch * oh_n) as nh:
        n = nh // oh_n
        oh = nh % oh_n
        acc = T.alloc_buffer((ow_n,), "int32", scope="local")
        with T.serial(0, ow_n) as ow:
            T.buffer_store(acc, tirx.const(0, "int32"), [ow])
        for ab in range(geom.act_bits):
            with T.serial(0, geom.kernel_h) as kh:
                with T.serial(0, geom.kernel_w) as kw:
                    with T.serial(0, geom.padded_words) as cw:
                        with T.serial(0, ow_n) as ow:
                            total = acc[ow]
                            for half in range(halves):
                                word = apk[n, ab, oh * sh + kh * dh, cw, half, ow * sw + kw * dw]
                                total = total + (tirx.Cast("int32", tirx.popcount(word)) << ab)
                            T.buffer_store(acc, total, [ow])
        with T.serial(0, ow_n) as ow:
            T.buffer_store(wsum, acc[ow] * scale, [n, oh, ow])
    return wsum
