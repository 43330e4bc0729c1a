"""Portable instruction choice for LLVM targets without AVX2 or NEON: ``llvm.ctpop`` on 64-bit lanes.

Correct everywhere LLVM runs; LLVM lowers the vector popcount with whatever the target has (``popcnt``, SSSE3
shuffles or bit arithmetic). Counts accumulate straight into 64-bit lanes, so no chunking is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx

from .geometry import BitserialGeometry
from .microkernel import Tiling, WeightLoader, flat_weights
from .stages import ramp

__all__ = ["GenericIsa"]


class GenericIsa:
    """Four output channels per vector of uint64 words (``oc_per_vector`` lanes; a subclass may widen it)."""

    name = "generic-llvm"
    halves = 1
    oc_per_vector = 4
    counter_dtype = "int64x4"
    chunked = False

    def prepare_weights(self, geom: BitserialGeometry, wpk: tirx.Buffer) -> WeightLoader:
        flat = flat_weights(geom, wpk)
        return lambda row, half, lane0: flat[row, ramp(lane0, self.oc_per_vector)]

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        return tirx.Broadcast(word, self.oc_per_vector)

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        return tirx.Cast("int64x4", tirx.popcount(a[0] & w[0]))

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        return counter

    def tiling(self, geom: BitserialGeometry) -> Tiling:
        return Tiling(tile_w=4, vec_blocks=2)
