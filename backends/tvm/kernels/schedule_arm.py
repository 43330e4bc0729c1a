"""AArch64 NEON instruction choice: ``cnt`` on 16 bytes, byte counters, ``uaddlp`` pairwise widening.

One 128-bit step for two output channels is ``and, cnt, add`` (the activation word is loaded with ``ld1r``).
Byte counts stay below 256 for a chunk of 31 words; three pairwise widening adds (``uaddlp`` 8->16->32->64 bit)
per chunk give two 64-bit per-channel counts. A tile of 4 pixels x 8 output channels uses 16 counter registers of
the 32, leaving room for the 4 weight vectors and the broadcasts; every weight load is shared by the 4 pixels.
The tile was chosen from the generated assembly (fewest spills among the tiles tried), not timed on hardware;
results were checked bit-exact under qemu-aarch64.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx

from .geometry import ConvGeometry
from .microkernel import Tiling, WeightLoader, flat_weights
from .stages import ramp

__all__ = ["NeonIsa"]

_UADDLP = (
    ("uint16x8", "llvm.aarch64.neon.uaddlp.v8i16.v16i8"),
    ("uint32x4", "llvm.aarch64.neon.uaddlp.v4i32.v8i16"),
    ("uint64x2", "llvm.aarch64.neon.uaddlp.v2i64.v4i32"),
)


class NeonIsa:
    """NEON: two output channels (uint64 words) per 128-bit register, byte counters."""

    name = "aarch64-neon"
    halves = 1
    oc_per_vector = 2
    counter_dtype = "uint8x16"
    chunked = True

    def prepare_weights(self, geom: ConvGeometry, wpk: tirx.Buffer) -> WeightLoader:
        flat = flat_weights(geom, wpk)
        return lambda row, half, lane0: tirx.reinterpret("uint8x16", flat[row, ramp(lane0, 2)])

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        return tirx.reinterpret("uint8x16", tirx.Broadcast(word, 2))

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        return tirx.popcount(a[0] & w[0])

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        value = counter
        for dtype, name in _UADDLP:
            value = tirx.call_llvm_pure_intrin(dtype, name, value)
        return tirx.reinterpret("int64x2", value)

    def tiling(self, geom: ConvGeometry) -> Tiling:
        """4 pixels x 8 channels: 16 counters of the 32 q registers, 4 weight vectors, broadcasts, temporaries."""
        return Tiling(tile_w=4, vec_blocks=4)
