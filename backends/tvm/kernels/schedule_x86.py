"""x86 instruction choices: AVX2 nibble-lookup popcounts, and AVX-512 ``vpopcntq`` where the CPU has VPOPCNTDQ.

**AVX2** (:class:`Avx2Isa`): popcounts looked up per nibble (``vpshufb``), counted in bytes, widened by ``vpsadbw``.

AVX2 has no vector popcount. With activation and weight words stored as separate low and high nibbles (the
weights are split once per call into a scratch copy), one 256-bit step for four output channels is
``and, and, pshufb, pshufb, add, add``; the weight operands come straight from memory, so a tile needs registers
only for its byte counters, two activation broadcasts and the lookup table. Bytes stay below 256 for a chunk of
31 words; one ``psadbw`` per chunk turns 32 byte counts into four 64-bit per-channel counts.

**AVX-512 VPOPCNTDQ** (:class:`Avx512PopcntIsa`, Ice Lake server, Zen 4 and later): ``vpopcntq`` counts each
64-bit lane directly, so a 512-bit step covers eight output channels with ``and, popcnt, add`` and needs neither
nibble splitting nor byte counters.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .geometry import BitserialGeometry
from .layout import OC_BLOCK
from .microkernel import Tiling, WeightLoader, flat_weights, weight_rows
from .schedule_generic import GenericIsa
from .stages import ramp, vconst

__all__ = ["Avx2Isa", "Avx512PopcntIsa"]

_PSHUFB = "llvm.x86.avx2.pshuf.b"
_PSADBW = "llvm.x86.avx2.psad.bw"


def _lookup_table() -> tirx.Expr:
    """popcount of 0..15, in both 128-bit halves (vpshufb looks up within each half)."""
    lo = sum(bin(i).count("1") << (8 * i) for i in range(8))
    hi = sum(bin(i + 8).count("1") << (8 * i) for i in range(8))
    words = tirx.Shuffle(
        [tirx.Broadcast(tirx.const(lo, "uint64"), 2), tirx.Broadcast(tirx.const(hi, "uint64"), 2)], [0, 2, 1, 3]
    )
    return tirx.reinterpret("uint8x32", words)


class Avx2Isa:
    """AVX2: four output channels (uint64 words) per 256-bit register, byte counters."""

    name = "x86-avx2"
    halves = 2
    oc_per_vector = 4
    counter_dtype = "uint8x32"
    chunked = True

    def prepare_weights(self, geom: BitserialGeometry, wpk: tirx.Buffer) -> WeightLoader:
        rows = weight_rows(geom)
        flat = flat_weights(geom, wpk)
        split = T.alloc_buffer((rows, 2, OC_BLOCK), "uint64")
        low = vconst(0x0F0F0F0F0F0F0F0F, "uint64", OC_BLOCK)
        with T.parallel(0, rows) as r:
            word = flat[r, ramp(0, OC_BLOCK)]
            T.buffer_store(split, word & low, [r, 0, ramp(0, OC_BLOCK)])
            T.buffer_store(split, (word >> vconst(4, "uint64", OC_BLOCK)) & low, [r, 1, ramp(0, OC_BLOCK)])

        def load(row: tirx.Expr, half: int, lane0: tirx.Expr) -> tirx.Expr:
            return tirx.reinterpret("uint8x32", split[row, half, ramp(lane0, 4)])

        return load

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        return tirx.reinterpret("uint8x32", tirx.Broadcast(word, 4))

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        lut = _lookup_table()
        lo = tirx.call_llvm_pure_intrin("uint8x32", _PSHUFB, lut, a[0] & w[0])
        hi = tirx.call_llvm_pure_intrin("uint8x32", _PSHUFB, lut, a[1] & w[1])
        return lo + hi

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        return tirx.call_llvm_pure_intrin("int64x4", _PSADBW, counter, vconst(0, "uint8", 32))

    def tiling(self, geom: BitserialGeometry) -> Tiling:
        """Register tile for the 16 ymm registers (counters + lookup table + 2 broadcasts + 2 weights + temporaries).

        Measured on Zen 3: with one word per pixel (<= 64 channels) LLVM unrolls the 3 kernel columns and reuses
        broadcasts across them, so the narrower 3 x 8 tile avoids spills; with more words a row of up to 7 pixels
        x 4 channels keeps both weight halves in registers and reloads nothing. The width is picked to leave the
        smallest tail (ResNet rows 56, 28, 14 and 7 are multiples of 7).
        """
        if geom.padded_words == 1:
            return Tiling(tile_w=3, vec_blocks=2)
        width = geom.out_w
        if width <= 7:
            return Tiling(tile_w=max(width, 1), vec_blocks=1)
        best = min(range(7, 3, -1), key=lambda p: (-(width % p == 0), (p - width % p) % p))
        return Tiling(tile_w=best, vec_blocks=1)


#: widest register tile of the AVX-512 kernel: its counters and sums (64 bytes a pixel each) stay in 28 of the 32
#: zmm registers and under ``STACK_BYTES``
_AVX512_MAX_TILE = 14


class Avx512PopcntIsa(GenericIsa):
    """AVX-512 VPOPCNTDQ: eight output channels (uint64 words) per 512-bit register, 64-bit counters.

    One step for eight channels is ``vpandq`` (the activation broadcast folded in as ``{1to8}``), ``vpopcntq`` and
    ``vpaddq``. The counts are already per-channel 64-bit sums, so the weights need no split, nothing is chunked,
    and widening is a no-op cast.
    """

    name = "x86-avx512-vpopcntdq"
    oc_per_vector = 8
    counter_dtype = "uint64x8"

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        return tirx.popcount(a[0] & w[0])

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        return tirx.Cast("int64x8", counter)

    def tiling(self, geom: BitserialGeometry) -> Tiling:
        """One vector of eight channels (all of ``OC_BLOCK``) x a row split into near-equal tiles of <= 14 pixels.

        From the znver4 assembly of ResNet-style layers, with cycles from ``llvm-mca`` 14's Ice Lake model (it has
        no Zen 4 model): with small tiles LLVM unrolls a whole 3x3 reduction, hoists the activation
        broadcasts or weights out of the bit-plane loops and spills them; with 10-14 pixels it keeps a loop over
        the kernel and reloads the broadcasts as ``{1to8}`` operands, at about 1.05-1.2 cycles per ``vpopcntq``.
        Near-equal tiles avoid a short tail tile, which would fall back into the unrolled case.
        """
        width = max(geom.out_w, 1)
        tiles = -(-width // _AVX512_MAX_TILE)
        return Tiling(tile_w=-(-width // tiles), vec_blocks=1)
