"""Integer dot-product kernels (conv2d and dense): exact int32 accumulation of 8-bit-range integers.

The math is stated once in TE (:func:`_conv_compute`): activations are packed into channel blocks
``pack[n, cb, y, x, c]`` (zero padded), weights into ``w[ot, cb, ky, kx, ci, lane, k]`` and

    acc[n, ot, y, x, lane] = sum_{cb, ky, kx, ci, k} pack[n, cb, y', x', ci*K + k] * w[ot, cb, ky, kx, ci, lane, k]

which is a sequence of "``lanes`` output channels += a K-element dot product of one input pixel" steps (the
plain statement of the same sum, unblocked, is :mod:`.reference`). The schedule keeps a ``tile_w`` pixels x
``oc_vectors`` register tile of accumulators and maps each step onto one instruction of the target (a
:class:`DotIsa`); the tile, the channel blocking and the chain are a :class:`DotTiling` (:func:`dot_tiling`):

========================  =============  ======  ===  ======================================================
ISA                       operands       lanes   K    instruction
========================  =============  ======  ===  ======================================================
``avx512-vnni``           u8 x s8        16      4    ``vpdpbusd`` (TVM's ``dot_16x4_vnni`` intrinsic)
``avx512-vnni-halved``    u8 x s8        16      4    ``vpdpbusd`` on halved odd weights (:func:`halved_weight`)
``avx2``                  s16 x s16      8       2    ``vpmaddwd`` + ``vpaddd`` (exact for every 8-bit code)
``neon-sdot``             s8 x s8        4       4    ``sdot`` (TVM's ``dot_4x4_i8i8s32_sdot``), needs +dotprod
``neon`` / ``generic``    s16 x s16      8 / 4   1    LLVM's vectorizer (``smlal`` on aarch64)
========================  =============  ======  ===  ======================================================

None of these saturates: ``vpdpbusd`` and ``sdot`` accumulate 4 products straight into int32 and ``vpmaddwd``
adds two int16 x int16 products into int32 (``vpmaddubsw``, which adds in int16 with saturation, is not used).
Each ISA states which value ranges it takes (:meth:`DotIsa.accepts`); the caller picks another one otherwise.
``avx2-u8s8`` adds in int16 lanes over a chain of steps and widens once per chain; :func:`chain_plan` makes
the chain as long as the layer's value ranges keep exact. Convolutions with few input channels fold their
kernel columns into the channel axis (:func:`folds_kernel_columns`) so a block is not mostly padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from fxquant.backends.tvm.build import has_feature
from fxquant.conv_geometry import ConvGeometry, DenseGeometry

__all__ = [
    "Chain", "DotIsa", "DotKernel", "DotTiling", "DOT_ISAS", "chain_plan", "dot_tiling", "select_dot_isa",
    "dot_conv2d", "dot_dense", "folds_kernel_columns", "halved_weight", "tile_width", "dot_isa_choices",
    "KERNEL_VERSION",
]

#: bumped whenever the generated code changes, so cached timings of older kernels are not reused
KERNEL_VERSION = "dot-6"

_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-(2**15), 2**15 - 1)}


@dataclass(frozen=True)
class DotIsa:
    """One instruction choice: ``lanes`` int32 accumulators += a ``k``-element dot product per instruction."""

    name: str
    lanes: int
    k: int
    data_dtype: str
    weight_dtype: str
    intrin: str | None  # registered TensorIntrin name, or None: plain vectorized loop
    chain16: bool = False  # partial sums of a chain (see :class:`Chain`) are formed in int16 lanes, then widened
    halved: bool = False  # odd weights w stored as (w - 1) / 2, see :func:`halved_weight`

    def accepts(self, data_range: tuple[int, int], weight_range: tuple[int, int], chain_steps: int = 1) -> bool:
        """Whether every activation value and weight fits the operand types exactly and, for ``chain16``, whether
        ``chain_steps`` steps of two products each stay inside int16 (no lane ever saturates or wraps)."""
        (dlo, dhi), (wlo, whi) = _RANGES[self.data_dtype], _RANGES[self.weight_dtype]
        if self.halved:
            wlo, whi = 2 * wlo + 1, 2 * whi + 1
        fits = dlo <= data_range[0] and data_range[1] <= dhi and wlo <= weight_range[0] and weight_range[1] <= whi
        if not (fits and self.chain16):
            return fits
        largest = max(abs(v) for v in data_range) * max(abs(v) for v in weight_range)
        return chain_steps * 2 * largest <= 2**15 - 1

    def chain_steps(self, kernel_w: int, in_channels: int) -> int:
        """Steps of the shortest int16 chain: one kernel row of a channel block (longer ones: :func:`chain_plan`)."""
        cb = min(self.channel_block, _ceil_to(in_channels, self.k))
        return kernel_w * (cb // self.k)

    @property
    def channel_block(self) -> int:
        """Input channels per packed block: 16 bytes of int8 (or 8 int16) per pixel."""
        return max(self.k, 16 if self.data_dtype.endswith("int8") else 8)


def _dot_intrin(name: str, lanes: int, k: int, data_dtype: str, weight_dtype: str, impl_body: Callable) -> str:
    """Register ``C[lanes] += sum_k A[k] * B[lanes, k]`` (int32) with the implementation ``impl_body``."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (k,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, k), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(A[vj], "int32") * T.cast(B[vi, vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (k,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, k), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = impl_body(A, B, C)

    TensorIntrin.register(name, desc, impl, override=True)
    return name


def _pmaddubsw_step(name: str) -> str:
    """``P[8, 2] += A[h*2 + j] * B[lane, h*2 + j]`` in int16 lanes: one ``vpmaddubsw`` + ``vpaddw``.

    Exact only where every pair sum and every chain of them stays inside int16: the caller checks that
    with :meth:`DotIsa.accepts` before choosing this instruction.
    """

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8, 2), "int16", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8, 0:2])
            for i, h, j in T.grid(8, 2, 2):
                with T.sblock("update"):
                    vi, vh, vj = T.axis.remap("SSR", [i, h, j])
                    C[vi, vh] = C[vi, vh] + T.Cast("int16", A[vh * 2 + vj]) * T.Cast("int16", B[vi, vh * 2 + vj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8, 2), "int16", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8, 0:2])
            quad = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(quad, 8), dtype="uint8x32"), B.vload([0, 0], dtype="int8x32"),
                dtype="int16x16",
            )
            C[0, T.ramp(T.int32(0), 1, 16)] = C.vload([0, 0], dtype="int16x16") + pairs

    TensorIntrin.register(name, desc, impl, override=True)
    return name


def _widen_pairs(name: str) -> str:
    """``D[8] += P[8, 0] + P[8, 1]`` from int16 to int32: one ``vpmaddwd`` by ones + ``vpaddd``."""

    @T.prim_func(s_tir=True)
    def desc(p: T.handle, d: T.handle) -> None:
        P = T.match_buffer(p, (8, 2), "int16", offset_factor=1, scope="local")
        D = T.match_buffer(d, (8,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(D[0:8], P[0:8, 0:2])
            T.writes(D[0:8])
            for i, h in T.grid(8, 2):
                with T.sblock("update"):
                    vi, vh = T.axis.remap("SR", [i, h])
                    D[vi] = D[vi] + T.Cast("int32", P[vi, vh])

    @T.prim_func(s_tir=True)
    def impl(p: T.handle, d: T.handle) -> None:
        P = T.match_buffer(p, (8, 2), "int16", offset_factor=1, scope="local")
        D = T.match_buffer(d, (8,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(D[0:8], P[0:8, 0:2])
            T.writes(D[0:8])
            D[T.ramp(T.int32(0), 1, 8)] = D.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), P.vload([0, 0], dtype="int16x16"),
                T.broadcast(T.int16(1), 16), dtype="int32x8",
            )

    TensorIntrin.register(name, desc, impl, override=True)
    return name


def _pmaddwd(A, B, C):  # noqa: N803 (buffer names as in the intrinsic)
    pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
    a = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
    b = B.vload([0, 0], dtype="int16x16")
    return C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype="int32x8"
    )


def _vpdpbusd(A, B, C):  # noqa: N803
    # LLVM 22 takes the byte vectors as <64 x i8> (earlier versions as <16 x i32>)
    quad = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
    a = T.reinterpret(T.broadcast(quad, 16), dtype="int8x64")
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
        a, B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
    )


def _sdot(A, B, C):  # noqa: N803
    quad = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
    a = T.reinterpret(T.broadcast(quad, 4), dtype="int8x16")
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype="int32x4"),
        a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4",
    )


@cache
def _intrinsics() -> dict[str, str]:
    """Register the three intrinsics once. TVM ships VNNI and sdot ones too (``tvm.s_tir.tensor_intrin``), but
    importing that package registers every GPU intrinsic as well (about a minute), and its descriptions
    accumulate into a global-scope buffer where ours accumulate into the register tile (``local``)."""
    return {
        "avx2": _dot_intrin("fxquant_dot_8x2_i16_avx2", 8, 2, "int16", "int16", _pmaddwd),
        "avx512-vnni": _dot_intrin("fxquant_dot_16x4_u8i8_vnni", 16, 4, "uint8", "int8", _vpdpbusd),
        "neon-sdot": _dot_intrin("fxquant_dot_4x4_i8i8_sdot", 4, 4, "int8", "int8", _sdot),
        "avx2-u8s8": _pmaddubsw_step("fxquant_dot_8x2x2_u8s8_i16_avx2"),
        "avx2-widen": _widen_pairs("fxquant_widen_8x2_i16_i32_avx2"),
    }


DOT_ISAS: dict[str, DotIsa] = {
    "avx2-u8s8": DotIsa("avx2-u8s8", 8, 4, "uint8", "int8", "avx2-u8s8", chain16=True),
    "avx512-vnni": DotIsa("avx512-vnni", 16, 4, "uint8", "int8", "avx512-vnni"),
    "avx512-vnni-halved": DotIsa("avx512-vnni-halved", 16, 4, "uint8", "int8", "avx512-vnni", halved=True),
    "avx2": DotIsa("avx2", 8, 2, "int16", "int16", "avx2"),
    "neon-sdot": DotIsa("neon-sdot", 4, 4, "int8", "int8", "neon-sdot"),
    "neon": DotIsa("neon", 4, 1, "int16", "int16", None),
    "generic": DotIsa("generic", 8, 1, "int16", "int16", None),
}

#: widest register tile per instruction choice, (output pixels, accumulator vectors): what the register file
#: holds (16 ymm on x86 AVX2, 32 zmm with AVX-512, 32 q on aarch64)
_REGISTER_TILES: dict[str, tuple[int, int]] = {
    "avx2-u8s8": (4, 2), "avx512-vnni": (7, 2), "avx512-vnni-halved": (7, 2), "avx2": (4, 2), "neon-sdot": (4, 4),
    "neon": (4, 4), "generic": (4, 1),
}


def dot_isa_choices(
    target: tvm.target.Target,
    data_range: tuple[int, int],
    weight_range: tuple[int, int],
    kernel_w: int = 1,
    in_channels: int = 16,
    odd_weights: bool = False,
) -> list[DotIsa]:
    """Every instruction choice of ``target`` that holds these value ranges exactly, fastest first (for
    ``avx2-u8s8``, over a chain of one kernel row: ``kernel_w`` x the channel block). ``odd_weights`` (every
    weight odd, as the bipolar encoding makes them) admits ``avx512-vnni-halved`` for 8-bit bipolar weights."""
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")):
        order = ["neon-sdot", "neon"] if has_feature(target, "dotprod") else ["neon"]
    elif has_feature(target, "avx512vnni") and has_feature(target, "avx512bw"):
        order = ["avx512-vnni", *(["avx512-vnni-halved"] if odd_weights else []), "avx2"]
    elif has_feature(target, "avx2"):
        order = ["avx2-u8s8", "avx2"]
    else:
        order = []
    isas = [DOT_ISAS[name] for name in [*order, "generic"]]
    return [isa for isa in isas if isa.accepts(data_range, weight_range, isa.chain_steps(kernel_w, in_channels))]


def select_dot_isa(
    target: tvm.target.Target,
    data_range: tuple[int, int],
    weight_range: tuple[int, int],
    kernel_w: int = 1,
    in_channels: int = 16,
    odd_weights: bool = False,
) -> DotIsa:
    """The fastest instruction choice of ``target`` for these value ranges (:func:`dot_isa_choices`)."""
    choices = dot_isa_choices(target, data_range, weight_range, kernel_w, in_channels, odd_weights)
    if not choices:
        raise ValueError(f"values {data_range} x weights {weight_range} exceed 16-bit operands")
    return choices[0]


@dataclass(frozen=True)
class Chain:
    """How far an ``avx2-u8s8`` int16 chain runs before it is widened into int32: ``rows`` kernel rows of
    ``blocks`` channel blocks (the least, one row of one block, is what :func:`select_dot_isa` checked)."""

    blocks: int = 1
    rows: int = 1


def _chain(work: ConvGeometry, isa: DotIsa, channel_block: int, data_range: tuple[int, int] | None,
           weight_range: tuple[int, int] | None) -> Chain:
    """The longest chain these value ranges keep exact: the whole kernel window of as many channel blocks as
    fit, else one kernel row. Fewer widenings, longer inner loops (low-bit layers chain the whole window)."""
    if not isa.chain16 or data_range is None or weight_range is None:
        return Chain()
    kh, kw = work.kernel
    blocks = -(-work.in_channels // channel_block)
    largest = max(abs(v) for v in data_range) * max(abs(v) for v in weight_range)
    max_steps = (2**15 - 1) // (2 * max(largest, 1))
    window = kh * kw * (channel_block // isa.k)
    if window > max_steps:
        return Chain()
    fitting = [g for g in range(1, blocks + 1) if blocks % g == 0 and g * window <= max_steps]
    return Chain(blocks=max(fitting), rows=kh)


@dataclass(frozen=True)
class DotTiling:
    """How one dot-product layer is tiled (chosen by :func:`dot_tiling`, recorded in the manifest)."""

    tile_w: int  # output pixels per register tile
    oc_vectors: int  # accumulator vectors (``isa.lanes`` output channels each) per pixel in the tile
    channel_block: int  # input channels per packed block, a multiple of ``isa.k``
    fold_columns: bool = False  # kernel columns folded into the channel axis (:func:`folds_kernel_columns`)
    chain: Chain = Chain()  # avx2-u8s8: int16 partial sums per chain

    def as_dict(self) -> dict[str, Any]:
        return {"tile_w": self.tile_w, "oc_vectors": self.oc_vectors, "channel_block": self.channel_block,
                "fold_columns": self.fold_columns, "chain_blocks": self.chain.blocks, "chain_rows": self.chain.rows}


def tile_width(out_width: int, max_w: int) -> int:
    """Pixels per register tile: of ``max_w - 1`` and ``max_w``, the one that computes the fewest pixels in all (a
    partial last tile costs a whole one), the wider on a tie. ResNet's widths (112, 56, 28, 14, 7) take 7 on
    AVX-512 VNNI, where 6 left a tail tile of 1 to 2 pixels on each row (about 1.6x slower on the 7-wide layer4)."""
    if out_width <= max_w:
        return out_width
    candidates = range(max(1, max_w - 1), max_w + 1)
    return min(candidates, key=lambda t: (-(-out_width // t) * t, -t))


def dot_tiling(geom: ConvGeometry | DenseGeometry, isa: DotIsa, data_range: tuple[int, int] | None = None,
               weight_range: tuple[int, int] | None = None) -> DotTiling:
    """The tiling of ``geom`` on ``isa`` (the target's instruction choice, :func:`select_dot_isa`): the ISA's
    register tile clipped to the layer, its channel block, folded kernel columns where they save instructions,
    and, given the layer's value ranges, the longest exact int16 chain (without them: one kernel row)."""
    conv = geom.as_conv() if isinstance(geom, DenseGeometry) else geom
    fold = folds_kernel_columns(conv, isa)
    work = _working_geometry(conv, fold)
    padded = _ceil_to(work.in_channels, isa.k)
    channel_block = padded if fold else min(isa.channel_block, padded)  # folded: one block of every value
    max_w, max_vectors = _REGISTER_TILES[isa.name]
    return DotTiling(
        tile_w=tile_width(work.out_width, max_w),
        oc_vectors=min(max_vectors, -(-work.out_channels // isa.lanes)),
        channel_block=channel_block,
        fold_columns=fold,
        chain=_chain(work, isa, channel_block, data_range, weight_range),
    )


def chain_plan(geom: ConvGeometry, isa: DotIsa, data_range: tuple[int, int], weight_range: tuple[int, int]) -> Chain:
    """The chain :func:`dot_tiling` picks for these value ranges."""
    return dot_tiling(geom, isa, data_range, weight_range).chain


@dataclass(frozen=True)
class DotKernel:
    """A scheduled PrimFunc ``(data int32, packed_weight, out int32)`` and how to pack a weight for it."""

    func: tirx.PrimFunc
    pack: Callable[[np.ndarray], np.ndarray]
    isa: DotIsa


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


#: a folded channel block holds at most this many channels (one block: every step reads one pixel)
MAX_FOLDED_CHANNELS = 64


def _row_steps(channels: int, kernel_w: int, block: int, k: int) -> int:
    """Instructions per output vector per kernel row: ``kernel_w`` pixels of zero-padded channel blocks."""
    return kernel_w * _ceil_to(channels, block) // k


def folds_kernel_columns(geom: ConvGeometry, isa: DotIsa) -> bool:
    """Whether the kernel's columns go into the channel axis (a stem's 3 channels x 7 columns: one block of
    21 values padded to 22 or 24, instead of 7 blocks of 3 padded to 4): where it takes fewer instructions."""
    kw, channels = geom.kernel[1], geom.in_channels
    if geom.groups != 1 or kw == 1 or geom.dilation[1] != 1 or _ceil_to(channels * kw, isa.k) > MAX_FOLDED_CHANNELS:
        return False
    plain = _row_steps(channels, kw, min(isa.channel_block, _ceil_to(channels, isa.k)), isa.k)
    return _row_steps(channels * kw, 1, _ceil_to(channels * kw, isa.k), isa.k) < plain


def _working_geometry(geom: ConvGeometry, fold: bool) -> ConvGeometry:
    """The convolution the reduction runs: ``geom`` itself, or with the kernel columns folded into channels
    (a (kh, 1) kernel over a virtual input whose pixel x holds input pixels x, x + d, ..., x + (kw-1) d)."""
    if not fold:
        return geom
    (kh, kw), (dh, dw) = geom.kernel, geom.dilation
    top, left, bottom, right = geom.padding
    width = geom.width + left + right - (kw - 1) * dw
    return ConvGeometry(geom.batch, geom.in_channels * kw, geom.height, width, geom.out_channels, (kh, 1),
                        geom.stride, (top, 0, bottom, 0), (dh, 1), 1)


def _folded_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW -> O (kw*C) H 1, channels column-major: folded channel ``kx * C + c`` is ``weight[:, c, :, kx]``."""
    o, c, kh, kw = weight.shape
    return weight.transpose(0, 3, 1, 2).reshape(o, kw * c, kh, 1)


@dataclass(frozen=True)
class _Blocking:
    """Padded extents of one layer for an ISA."""

    channel_block: int
    channel_blocks: int
    oc_tiles: int  # output-channel vectors, a multiple of oc_vectors
    tile_w: int
    padded_out_w: int
    padded_h: int
    padded_w: int


def _blocking(geom: ConvGeometry, isa: DotIsa, tiling: DotTiling) -> _Blocking:
    """Padded extents of the working geometry ``geom`` under ``tiling``."""
    cb = tiling.channel_block
    tiles = _ceil_to(-(-geom.out_channels // isa.lanes), tiling.oc_vectors)
    tile_w = tiling.tile_w
    ow = _ceil_to(geom.out_width, tile_w)
    (sh, sw), (dh, dw), (kh, kw) = geom.stride, geom.dilation, geom.kernel
    top, left, bottom, right = geom.padding
    padded_w = max(geom.width + left + right, (ow - 1) * sw + (kw - 1) * dw + 1)
    padded_h = max(geom.height + top + bottom, (geom.out_height - 1) * sh + (kh - 1) * dh + 1)
    return _Blocking(cb, -(-geom.in_channels // cb), tiles, tile_w, ow, padded_h, padded_w)


def halved_weight(weight: np.ndarray) -> np.ndarray:
    """Odd weights ``w`` -> ``(w - 1) / 2``: int8 for every 8-bit bipolar weight (-255..255). ``vpdpbusd`` then
    accumulates ``h = sum a (w - 1) / 2`` (u8 x s8, no saturation) and ``sum a w = 2 h + sum a``, where the window
    sum ``sum a`` is one small pass over the input shared by every output channel."""
    w = np.asarray(weight, dtype=np.int64)
    if not np.all(w % 2 == 1):
        raise ValueError("the halved dot-product kernel takes odd weights only (bipolar codes)")
    return (w - 1) // 2


def _pack_weight(weight: np.ndarray, geom: ConvGeometry, isa: DotIsa, blk: _Blocking) -> np.ndarray:
    """OIHW integers -> (oc_tiles, channel_blocks, kh, kw, cb/k, lanes, k), zero padded."""
    o, c, kh, kw = weight.shape
    full = np.zeros((blk.oc_tiles * isa.lanes, blk.channel_blocks * blk.channel_block, kh, kw), dtype=np.int64)
    full[:o, :c] = weight
    tiled = full.reshape(blk.oc_tiles, isa.lanes, blk.channel_blocks, blk.channel_block // isa.k, isa.k, kh, kw)
    return np.ascontiguousarray(tiled.transpose(0, 2, 5, 6, 3, 1, 4)).astype(isa.weight_dtype)


def _window_sum(geom: ConvGeometry, load: Callable) -> te.Tensor:
    """``s[n, y, x]``: the sum of every input value output pixel (y, x) reads (all channels, the kernel window,
    zero padding), as a channel sum per padded pixel and then a window sum of those."""
    n_, c_, h_, w_ = geom.input_shape
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    top, left, bottom, right = geom.padding
    rc = te.reduce_axis((0, c_), "wc")

    def pixel(n, y, x):
        inside = tirx.all(y >= top, y < h_ + top, x >= left, x < w_ + left)
        return te.sum(tirx.if_then_else(inside, load(n, rc, y - top, x - left), 0), axis=rc)

    column = te.compute((n_, h_ + top + bottom, w_ + left + right), pixel, name="channel_sum")
    ry, rx = te.reduce_axis((0, kh), "wy"), te.reduce_axis((0, kw), "wx")
    return te.compute(
        (n_, geom.out_height, geom.out_width),
        lambda n, y, x: te.sum(column[n, y * sh + ry * dh, x * sw + rx * dw], axis=[ry, rx]),
        name="window_sum",
    )


def _conv_compute(geom: ConvGeometry, work: ConvGeometry, isa: DotIsa, blk: _Blocking, dense: bool,
                  chain: Chain) -> list[te.Tensor]:
    """The math: pack activations into channel blocks, then the blocked int32 dot-product reduction over the
    working geometry ``work`` (``geom``, or ``geom`` with its kernel columns folded into the channels)."""
    n_, c_, h_, w_ = geom.input_shape
    kh_, kw_ = work.kernel
    (sh, sw), (dh, dw) = work.stride, work.dilation
    top, left = geom.padding[0], geom.padding[1]
    lanes, k, cb = isa.lanes, isa.k, blk.channel_block
    data = te.placeholder((n_, c_) if dense else geom.input_shape, "int32", name="data")
    weight = te.placeholder(
        (blk.oc_tiles, blk.channel_blocks, kh_, kw_, cb // k, lanes, k), isa.weight_dtype, name="weight"
    )

    def load(n, c, y, x):
        return data[n, c] if dense else data[n, c, y, x]

    def inside(y, x, c):
        return tirx.all(y >= top, y < h_ + top, x >= left, x < w_ + left, c < c_)

    if work is geom:
        def packed(n, b, y, x, c):
            ch = b * cb + c
            value = tirx.if_then_else(inside(y, x, ch), load(n, tirx.min(ch, c_ - 1), y - top, x - left), 0)
            return value.astype(isa.data_dtype)

        pack = te.compute((n_, blk.channel_blocks, blk.padded_h, blk.padded_w, cb), packed, name="pack")

        def act(n, b, yy, x, rx, c):
            return pack[n, b, yy, x * sw + rx * dw, c]
    else:
        # folded: padded NHWC rows without channel padding, so the kernel columns of one output pixel are the
        # contiguous values x*sw*C ... x*sw*C + kw*C - 1 of a row (the block's padding reads past them, into
        # values that meet zero weights; the row has that much slack)
        row = (geom.width + geom.padding[1] + geom.padding[3]) * c_ + cb

        def packed_row(n, y, i):
            x, c = i // c_, i % c_
            value = tirx.if_then_else(inside(y, x, c), load(n, c, y - top, x - left), 0)
            return value.astype(isa.data_dtype)

        pack = te.compute((n_, blk.padded_h, row), packed_row, name="pack")

        def act(n, b, yy, x, rx, c):
            return pack[n, yy, x * sw * c_ + c]

    rb = te.reduce_axis((0, blk.channel_blocks), "rb")
    ry = te.reduce_axis((0, kh_), "ry")
    rx = te.reduce_axis((0, kw_), "rx")
    rc = te.reduce_axis((0, cb // k), "rc")
    acc_shape = (n_, blk.oc_tiles, geom.out_height, blk.padded_out_w, lanes)
    if isa.chain16:
        # the same sum, grouped: int16 partial sums over a chain (``chain.rows`` kernel rows of ``chain.blocks``
        # channel blocks), in two halves of the K channels (the pairs one vpmaddubsw adds), then widened once
        rj = te.reduce_axis((0, k // 2), "rj")
        rbi = te.reduce_axis((0, chain.blocks), "rbi")
        ryi = te.reduce_axis((0, chain.rows), "ryi")

        def part_value(n, t, y, x, g, yo, lane, h):
            b, ky = g * chain.blocks + rbi, yo * chain.rows + ryi
            a = act(n, b, y * sh + ky * dh, x, rx, rc * k + h * (k // 2) + rj).astype("int16")
            w = weight[t, b, ky, rx, rc, lane, h * (k // 2) + rj].astype("int16")
            return te.sum(a * w, axis=[rbi, ryi, rx, rc, rj])

        groups, row_groups = blk.channel_blocks // chain.blocks, kh_ // chain.rows
        part = te.compute((*acc_shape[:4], groups, row_groups, lanes, 2), part_value, name="part")
        rb = te.reduce_axis((0, groups), "rb")
        ry = te.reduce_axis((0, row_groups), "ry")
        rh = te.reduce_axis((0, 2), "rh")
        acc = te.compute(
            acc_shape,
            lambda n, t, y, x, lane: te.sum(part[n, t, y, x, rb, ry, lane, rh].astype("int32"), axis=[rb, ry, rh]),
            name="acc",
        )
    else:
        rk = te.reduce_axis((0, k), "rk")

        def acc_value(n, t, y, x, lane):
            a = act(n, rb, y * sh + ry * dh, x, rx, rc * k + rk).astype("int32")
            return te.sum(a * weight[t, rb, ry, rx, rc, lane, rk].astype("int32"), axis=[rb, ry, rx, rc, rk])

        acc = te.compute(acc_shape, acc_value, name="acc")
    if isa.halved:  # sum a w = 2 sum a (w - 1) / 2 + the window sum of the input
        window = _window_sum(geom, load)

        def value(n, o, y, x):
            return acc[n, o // lanes, y, x, o % lanes] * 2 + window[n, y, x]
    else:
        def value(n, o, y, x):
            return acc[n, o // lanes, y, x, o % lanes]

    if dense:
        out = te.compute((n_, geom.out_channels), lambda n, o: value(n, o, 0, 0), name="out")
    else:
        out = te.compute(geom.output_shape, value, name="out")
    return [data, weight, out]


def _schedule_chained(func: tirx.PrimFunc, blk: _Blocking, oc_vectors: int, kernel_w: int,
                      chain: Chain) -> tirx.PrimFunc:
    """Register tile of int32 accumulators; per chain, a tile of int16 partials fed by vpmaddubsw."""
    sch = s_tir.Schedule(func)
    acc_b, part_b = sch.get_sblock("acc"), sch.get_sblock("part")
    out_b, pack_b = sch.get_sblock("out"), sch.get_sblock("pack")
    n, t, y, x, lane, rb, ry, rh = sch.get_loops(acc_b)
    to, ti = sch.split(t, [None, oc_vectors])
    xo, xi = sch.split(x, [None, blk.tile_w])
    sch.reorder(n, to, y, xo, rb, ry, ti, xi, lane, rh)
    sch.parallel(sch.fuse(n, to, y))
    sch.reverse_compute_at(out_b, xo)
    sch.set_scope(acc_b, 0, "local")
    sch.compute_at(part_b, ry)
    sch.set_scope(part_b, 0, "local")
    loops = sch.get_loops(part_b)
    below_row = loops[next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(ry))) + 1:]
    # compute_at leaves out loops of extent 1: name the remaining ones by the extents they must have
    expected = {"t": oc_vectors, "x": blk.tile_w, "lane": 8, "h": 2, "rbi": chain.blocks, "ryi": chain.rows,
                "rx": kernel_w, "rc": blk.channel_block // 4, "rj": 2}
    names = [name for name, extent in expected.items() if extent > 1]
    assert [int(sch.get(loop).extent) for loop in below_row] == [expected[n] for n in names], "unexpected loops"
    loop = dict(zip(names, below_row, strict=True))
    tile = [loop[n] for n in ("t", "x") if n in loop]
    reductions = [loop[n] for n in ("rbi", "ryi", "rx", "rc") if n in loop]
    sch.reorder(*reductions, *tile, loop["lane"], loop["h"], loop["rj"])
    init16 = sch.decompose_reduction(part_b, (reductions + tile + [loop["lane"]])[0])
    sch.vectorize(sch.fuse(*sch.get_loops(init16)[-2:]))
    sch.tensorize(loop["lane"], _intrinsics()["avx2-u8s8"])
    for tile_loop in tile:
        sch.unroll(tile_loop)
    init = sch.decompose_reduction(acc_b, rb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lane, _intrinsics()["avx2-widen"])
    sch.unroll(xi)
    sch.unroll(ti)
    _schedule_pack(sch, pack_b)
    return sch.mod["main"]


def _schedule_pack(sch: s_tir.Schedule, pack_b: Any) -> None:
    loops = sch.get_loops(pack_b)
    if len(loops) == 3:  # folded rows
        sch.parallel(sch.fuse(*loops[:2]))
        return
    pn, pb, py, px, pc = loops
    sch.parallel(sch.fuse(pn, pb, py))
    sch.unroll(pc)


def _schedule(func: tirx.PrimFunc, isa: DotIsa, blk: _Blocking, oc_vectors: int, kernel_w: int,
              chain: Chain, disjoint_windows: bool = False) -> tirx.PrimFunc:
    if isa.chain16:
        return _schedule_chained(func, blk, oc_vectors, kernel_w, chain)
    sch = s_tir.Schedule(func)
    acc_b, out_b, pack_b = sch.get_sblock("acc"), sch.get_sblock("out"), sch.get_sblock("pack")
    # halved: the output adds the input's window sums, computed in passes of their own before the tiles (a
    # block computed inside a tile must have all its producers there too), so the register tile is written
    # back to a whole accumulator and one more pass forms the output
    copy_b = sch.cache_write(acc_b, 0, "local") if isa.halved else None
    n, t, y, x, lane, rb, ry, rx, rc, rk = sch.get_loops(acc_b)
    to, ti = sch.split(t, [None, oc_vectors])
    xo, xi = sch.split(x, [None, blk.tile_w])
    sch.reorder(n, to, y, xo, rb, ry, rx, rc, ti, xi, lane, rk)
    sch.parallel(sch.fuse(n, to, y))
    if copy_b is None:
        sch.reverse_compute_at(out_b, xo)
        sch.set_scope(acc_b, 0, "local")
    else:
        sch.reverse_compute_at(copy_b, xo)
        sch.vectorize(sch.get_loops(copy_b)[-1])
        channel_sum, window_sum = sch.get_sblock("channel_sum"), sch.get_sblock("window_sum")
        # disjoint windows (each input pixel read by one window at most): channel sums only where a window reads
        # them, inside the window pass, which then stays on one thread (TVM cannot split that strided region)
        if disjoint_windows:
            sch.compute_at(channel_sum, sch.get_loops(window_sum)[2])
        blocks = (out_b,) if disjoint_windows else (channel_sum, window_sum, out_b)
        for block in blocks:
            loops = sch.get_loops(block)
            sch.parallel(sch.fuse(*loops[:2]) if len(loops) > 2 else loops[0])
    if isa.intrin is None:  # k == 1: a vector of lanes times one broadcast value, LLVM picks the multiply-add
        sch.reorder(rk, lane)
        sch.vectorize(lane)
    init = sch.decompose_reduction(acc_b, rb)
    sch.vectorize(sch.get_loops(init)[-1])
    if isa.intrin is not None:
        sch.tensorize(lane, _intrinsics()[isa.intrin])
    sch.unroll(xi)
    sch.unroll(ti)
    _schedule_pack(sch, pack_b)
    return sch.mod["main"]


def _build(geom: ConvGeometry, isa: DotIsa, dense: bool, tiling: DotTiling | None) -> DotKernel:
    tiling = tiling or dot_tiling(geom, isa)
    folded = tiling.fold_columns
    work = _working_geometry(geom, folded)
    blk = _blocking(work, isa, tiling)
    chain = tiling.chain
    func = te.create_prim_func(_conv_compute(geom, work, isa, blk, dense, chain))
    oc_vectors = min(tiling.oc_vectors, blk.oc_tiles)
    disjoint = all(k <= st for k, st in zip(geom.kernel, geom.stride, strict=True))  # 1x1, or kernel <= stride
    scheduled = _schedule(func, isa, blk, oc_vectors, work.kernel[1], chain, disjoint)
    scheduled = scheduled.with_attr("fxquant.dot_isa", isa.name)

    def pack(weight: np.ndarray) -> np.ndarray:
        w = weight.reshape(weight.shape[0], weight.shape[1], 1, 1) if dense else weight
        w = halved_weight(w) if isa.halved else w
        return _pack_weight(_folded_weight(w) if folded else w, work, isa, blk)

    return DotKernel(scheduled, pack, isa)


def dot_conv2d(geom: ConvGeometry, isa: DotIsa, tiling: DotTiling | None = None) -> DotKernel:
    """Scheduled conv2d ``(data int32 NCHW, packed weight, out int32 NCHW)`` for ``groups == 1``.

    Example::

        isa = select_dot_isa(target, (0, 15), (-8, 7))
        kernel = dot_conv2d(geom, isa, dot_tiling(geom, isa, (0, 15), (-8, 7)))  # weights go in as kernel.pack(w)
    """
    if geom.groups != 1:
        raise ValueError(f"the dot-product kernel takes groups=1 convolutions, got groups={geom.groups}")
    return _build(geom, isa, dense=False, tiling=tiling)


def dot_dense(geom: DenseGeometry, isa: DotIsa, tiling: DotTiling | None = None) -> DotKernel:
    """Scheduled dense ``(data int32 (N, K), packed weight, out int32 (N, O))``: a 1x1 convolution of a 1x1 image."""
    return _build(geom.as_conv(), isa, dense=True, tiling=tiling)
