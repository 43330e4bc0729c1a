"""The register-tiled bit-serial loop nest every target shares; the instructions come from a :class:`PopcountIsa`.

One PrimFunc holds the whole layer:

1. per-call weight preparation, if the ISA wants one (``prepare_weights``),
2. activation bit-packing into zero-padded planes (:func:`.stages.emit_activation_pack`),
3. bipolar window sums (:func:`.stages.emit_window_sums`),
4. the main loop, parallel over (batch, output-channel tile, output row). Each task walks its row in tiles of
   ``tile_w`` pixels x ``oc_tile`` output channels whose counters stay in vector registers::

       for each (activation bit i, weight bit j):
           for each chunk of at most 31 reduction words (kh, kw, channel word):
               counters = 0
               for each word: counters[p, v] += popcount(a_i[p] & w_j[v])       # 8-bit lanes
               acc[p, v] += widen(counters[p, v]) << (i + j)                    # int64 per channel
       out[o, pixel] = acc                     unsigned weights
       out[o, pixel] = 2 * acc + wsum[pixel]   bipolar weights (2c - n); wsum = -n * window sum of codes

Everything that can be negative is signed (int64 accumulators, int32 window sums and output); unsigned lanes only
add non-negative counts that cannot wrap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .geometry import ConvGeometry
from .layout import OC_BLOCK
from .stages import emit_activation_pack, emit_window_sums, out_index, ramp, vconst

__all__ = ["PopcountIsa", "Tiling", "WeightLoader", "build_bitserial", "weight_rows", "flat_weights"]

WeightLoader = Callable[[tirx.Expr, int, tirx.Expr], tirx.Expr]
"""``load(row, half, lane0)``: ``oc_per_vector`` weight words of one row (see :func:`weight_rows`) from lane0."""


class PopcountIsa(Protocol):
    """What a target contributes: how to count the bits of ``a & w`` per vector and widen the counts."""

    name: str
    halves: int  # 2: activation and weight words are stored as low and high nibbles
    oc_per_vector: int  # uint64 weight words (output channels) per vector register
    counter_dtype: str  # per-step count vector, e.g. "uint8x32"
    chunked: bool  # counts live in 8-bit lanes and must be widened every <= 31 words

    def prepare_weights(self, geom: ConvGeometry, wpk: tirx.Buffer) -> WeightLoader:
        """Emit any per-call weight preparation; return the weight loader."""
        ...

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        """One activation word in every lane, typed like the weight vectors."""
        ...

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        """Per-step counts (``counter_dtype``) of ``a & w``, summed over the halves."""
        ...

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        """Counts -> ``int64 x oc_per_vector`` per-output-channel totals."""
        ...

    def tiling(self, geom: ConvGeometry) -> Tiling:
        """The register tile for this layer."""
        ...


@dataclass(frozen=True)
class Tiling:
    """Register tile: ``tile_w`` output pixels of one row x ``vec_blocks`` vectors of output channels."""

    tile_w: int
    vec_blocks: int


def weight_rows(geom: ConvGeometry) -> int:
    """Rows of ``OC_BLOCK`` words in the packed weights: (block, kh, kw, weight bit, word) flattened."""
    taps = 1 if geom.dense else geom.kernel_h * geom.kernel_w
    return geom.oc_blocks * taps * geom.weight_bits * geom.padded_words


def flat_weights(geom: ConvGeometry, wpk: tirx.Buffer) -> tirx.Buffer:
    """A ``(rows, OC_BLOCK)`` view of the packed weight parameter."""
    return T.decl_buffer((weight_rows(geom), OC_BLOCK), "uint64", data=wpk.data)


def _row(geom: ConvGeometry, ob: tirx.Expr, kh: tirx.Expr, kw: tirx.Expr, wb: tirx.Expr, cw: tirx.Expr) -> tirx.Expr:
    kh_n, kw_n = (1, 1) if geom.dense else (geom.kernel_h, geom.kernel_w)
    return (((ob * kh_n + kh) * kw_n + kw) * geom.weight_bits + wb) * geom.padded_words + cw


def _nest(dims: Sequence[int], body: Callable[..., None], bound: tuple = ()) -> None:
    """Serial loops over ``dims``; ``body`` gets the loop variables (after ``bound``)."""
    if not dims:
        body(*bound)
        return
    with T.serial(0, dims[0]) as v:
        _nest(dims[1:], body, (*bound, v))


@dataclass(frozen=True)
class _Task:
    """Everything one register tile needs besides its position."""

    geom: ConvGeometry
    isa: PopcountIsa
    load_w: WeightLoader
    apk: tirx.Buffer
    out: tirx.Buffer
    wsum: tirx.Buffer | None
    vec_blocks: int


def _micro_kernel(
    task: _Task, n: tirx.Expr, ob: tirx.Expr, lane0: tirx.Expr, oh: tirx.Expr, ow0: tirx.Expr, tile_w: int
) -> None:
    geom, isa, vec_blocks = task.geom, task.isa, task.vec_blocks
    opv = isa.oc_per_vector
    oc_tile = opv * vec_blocks
    sh, sw = geom.stride
    dh, dw = geom.dilation
    if isa.chunked:
        dims, split = geom.reduction_dims()
    else:
        dims, split = (geom.kernel_h, geom.kernel_w, 1, geom.padded_words), 0
    lane_type, lanes = isa.counter_dtype.split("x")
    clanes = int(lanes)
    n_counters = tile_w * vec_blocks

    acc = T.alloc_buffer((tile_w * oc_tile,), "int64", scope="local")
    counts = T.alloc_buffer((n_counters * clanes,), lane_type, scope="local")
    T.buffer_store(acc, vconst(0, "int64", tile_w * oc_tile), [ramp(0, tile_w * oc_tile)])

    def chunk(ab: tirx.Expr, wb: tirx.Expr, *outer: tirx.Expr) -> None:
        T.buffer_store(counts, vconst(0, lane_type, n_counters * clanes), [ramp(0, n_counters * clanes)])

        def step(*inner: tirx.Expr) -> None:
            kh, kw, cwo, cwi = (*outer, *inner)
            cw = cwo * dims[3] + cwi
            row = _row(geom, ob, kh, kw, wb, cw)
            w = [[task.load_w(row, h, lane0 + v * opv) for h in range(isa.halves)] for v in range(vec_blocks)]
            ih = oh * sh + kh * dh
            for p in range(tile_w):
                iw = (ow0 + p) * sw + kw * dw
                a = [T.Bind(isa.broadcast(task.apk[n, ab, ih, cw, h, iw])) for h in range(isa.halves)]
                for v in range(vec_blocks):
                    at = ramp((p * vec_blocks + v) * clanes, clanes)
                    T.buffer_store(counts, counts[at] + isa.count(a, w[v]), [at])

        _nest(dims[split:], step)
        shift = tirx.Broadcast(tirx.Cast("int64", ab + wb), opv)
        for p in range(tile_w):
            for v in range(vec_blocks):
                wide = isa.widen(counts[ramp((p * vec_blocks + v) * clanes, clanes)]) << shift
                at = ramp(p * oc_tile + v * opv, opv)
                T.buffer_store(acc, acc[at] + wide, [at])

    _nest((geom.act_bits, geom.weight_bits, *dims[:split]), chunk)

    out_type = f"int32x{tile_w}" if tile_w > 1 else "int32"
    for j in range(oc_tile):
        o = ob * OC_BLOCK + lane0 + j
        value = tirx.Cast(out_type, acc[tirx.Ramp(j, oc_tile, tile_w) if tile_w > 1 else j])
        if task.wsum is not None:
            value = value * vconst(2, "int32", tile_w) + task.wsum[n, oh, ramp(ow0, tile_w)]
        store = out_index(geom, n, o, oh, ramp(ow0, tile_w))
        if geom.out_channels % OC_BLOCK:
            with T.If(o < geom.out_channels):
                with T.Then():
                    T.buffer_store(task.out, value, store)
        else:
            T.buffer_store(task.out, value, store)


def build_bitserial(geom: ConvGeometry, isa: PopcountIsa, tiling: Tiling) -> tirx.PrimFunc:
    """The whole layer as one PrimFunc ``(codes, packed_weight, out)``."""
    tile_w = max(1, min(tiling.tile_w, geom.out_w))
    oc_tile = isa.oc_per_vector * tiling.vec_blocks
    if OC_BLOCK % oc_tile:
        raise ValueError(f"{tiling} gives {oc_tile} output channels per tile; it must divide {OC_BLOCK}")
    subs = OC_BLOCK // oc_tile
    o_tiles = geom.oc_blocks * subs
    oh_n = geom.out_h
    full, tail = divmod(geom.out_w, tile_w)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("bitserial_dense" if geom.dense else "bitserial_conv2d")
            codes = T.arg("codes", T.buffer(geom.codes_shape, "int32"))
            wpk = T.arg("packed_weight", T.buffer(geom.weight_shape, "uint64"))
            out = T.arg("out", T.buffer(geom.out_shape, "int32"))
            T.func_attr({"tirx.noalias": True})
            load_w = isa.prepare_weights(geom, wpk)
            apk = emit_activation_pack(geom, codes, isa.halves)
            wsum = emit_window_sums(geom, apk) if geom.bipolar else None
            task = _Task(geom, isa, load_w, apk, out, wsum, tiling.vec_blocks)
            with T.parallel(0, geom.batch * o_tiles * oh_n) as it:
                n = it // (o_tiles * oh_n)
                ot = (it // oh_n) % o_tiles
                oh = it % oh_n
                ob = ot // subs
                lane0 = (ot % subs) * oc_tile
                with T.serial(0, full) as t:
                    _micro_kernel(task, n, ob, lane0, oh, t * tile_w, tile_w)
                if tail:
                    _micro_kernel(task, n, ob, lane0, oh, full * tile_w, tail)
    return ib.get()
