"""TIR stages every target's bit-serial kernel shares, emitted with the TVMScript IR builder.

* :func:`emit_activation_pack`: int32 NCHW codes -> zero-padded bit planes ``(N, AB, Hp, words, halves, Wp)`` of
  ``uint64`` words, vectorized along the image row (contiguous in NCHW). With ``halves == 2`` the word is split
  into its low and high nibbles (``half 1`` holds bits 4..7 of every byte shifted down by 4) so that an AVX2
  kernel can look popcounts up with one byte shuffle per nibble and no masking.
* :func:`emit_pixel_pairs`: the same planes with the words of neighbouring pixels side by side, for kernels that
  count two pixels per vector.
* :func:`emit_window_sums`: ``-(2^wb - 1) * sum(activation codes over the window)`` per output pixel, the whole
  correction that turns an unsigned-weight accumulator into a bipolar one (``w = 2c - n``), summed from the codes.

Stage buffers are allocated once per call; per-task scratch is avoided, since TVM serves every non-stack
allocation inside a parallel loop with a ``TVMBackendAllocWorkspace`` call per task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .geometry import BitserialGeometry
from .layout import WORD_BITS

__all__ = [
    "PACK_LANES",
    "vconst",
    "ramp",
    "codes_loader",
    "out_index",
    "emit_activation_pack",
    "emit_pixel_pairs",
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


def codes_loader(geom: BitserialGeometry, codes: tirx.Buffer) -> Callable[[Index, Index, Index, Index], tirx.Expr]:
    """(n, c, h, w_index) -> load; dense layers are a 1x1 image with the features as channels."""
    if geom.dense:
        return lambda n, c, h, w: codes[n, c]
    return lambda n, c, h, w: codes[n, c, h, w]


def out_index(geom: BitserialGeometry, n: Index, o: Index, oh: Index, ow: Index) -> list[Index]:
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


def emit_activation_pack(geom: BitserialGeometry, codes: tirx.Buffer, halves: int) -> tirx.Buffer:
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


def emit_pixel_pairs(geom: BitserialGeometry, apk: tirx.Buffer) -> tirx.Buffer:
    """The planes of :func:`emit_activation_pack` (``halves == 1``) as pixel pairs: ``(N, AB, Hp, Wp * words, 2)``.

    Entry ``[n, ab, h, c * words + cw]`` holds word ``cw`` of columns ``c`` and ``c + s`` (``s`` the stride; zero
    past the right edge): the two pixels a tap of neighbouring outputs reads. For an undilated kernel row the
    words of tap ``kw`` of the pair at column ``c0`` sit at ``c0 * words + (kw * words + cw)``: one run of
    consecutive entries per kernel row, and one 128-bit load per pair and word.
    """
    n_, ab_n, hp_n, wp_n, pw = geom.batch, geom.act_bits, geom.padded_h, geom.padded_w, geom.padded_words
    sw = geom.stride[1]
    pairs = T.alloc_buffer((n_, ab_n, hp_n, wp_n * pw, 2), "uint64")
    with T.parallel(0, n_ * ab_n * hp_n) as nah:
        n = nah // (ab_n * hp_n)
        ab = (nah // hp_n) % ab_n
        hp = nah % hp_n
        with T.serial(0, pw) as cw:
            with T.serial(0, wp_n) as c:
                T.buffer_store(pairs, apk[n, ab, hp, cw, 0, c], [n, ab, hp, c * pw + cw, 0])
                if wp_n > sw:
                    with T.If(c < wp_n - sw):
                        with T.Then():
                            T.buffer_store(pairs, apk[n, ab, hp, cw, 0, c + sw], [n, ab, hp, c * pw + cw, 1])
                        with T.Else():
                            T.buffer_store(pairs, tirx.const(0, "uint64"), [n, ab, hp, c * pw + cw, 1])
                else:
                    T.buffer_store(pairs, tirx.const(0, "uint64"), [n, ab, hp, c * pw + cw, 1])
    return pairs


def emit_window_sums(geom: BitserialGeometry, codes: tirx.Buffer) -> tirx.Buffer:
    """``wsum[n, oh, ow] = -(2^wb - 1) * sum of activation codes in the window`` (int32).

    Separable: first each padded pixel's code sum over its channels (plain int32 adds along the image row, which
    LLVM vectorizes; zero in the padding), then a ``kernel_h x kernel_w`` box sum of those per output pixel, so
    every code is added once rather than once per tap.
    """
    n_, hp_n, wp_n, oh_n, ow_n = geom.batch, geom.padded_h, geom.padded_w, geom.out_h, geom.out_w
    sh, sw = geom.stride
    dh, dw = geom.dilation
    top, left = geom.pad[0], geom.pad[1]
    scale = -((1 << geom.weight_bits) - 1)
    load = codes_loader(geom, codes)
    sums = T.alloc_buffer((n_, hp_n, wp_n), "int32")
    with T.parallel(0, n_ * hp_n) as nh:
        n = nh // hp_n
        hp = nh % hp_n
        with T.serial(0, wp_n) as c:
            T.buffer_store(sums, tirx.const(0, "int32"), [n, hp, c])
        with T.If(tirx.all(hp >= top, hp < top + geom.in_h)):
            with T.Then():
                with T.serial(0, geom.in_channels) as ch:
                    with T.serial(0, geom.in_w) as w:
                        T.buffer_store(sums, sums[n, hp, left + w] + load(n, ch, hp - top, w), [n, hp, left + w])
    wsum = T.alloc_buffer((n_, oh_n, ow_n), "int32")
    with T.parallel(0, n_ * oh_n) as nh:
        n = nh // oh_n
        oh = nh % oh_n
        with T.serial(0, ow_n) as ow:
            total = None
            for kh in range(geom.kernel_h):
                for kw in range(geom.kernel_w):
                    term = sums[n, oh * sh + kh * dh, ow * sw + kw * dw]
                    total = term if total is None else total + term
            T.buffer_store(wsum, total * scale, [n, oh, ow])
    return wsum
