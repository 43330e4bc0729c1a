"""Direct (im2col-free) conv2d and dense kernels with their CPU schedules, generic in the data type.

They serve every layer the bit-serial kernel does not take: integer layers at any bitwidth or group count
(``int32`` accumulation of int32 codes times int8/int32 weights, exact) and float layers (``float32``).
Output channels are packed in groups of ``DirectTiling.lanes`` so the innermost loop is one vector of output
channels that multiplies a broadcast input value, with a ``row_tile``-wide tile of accumulators kept in registers;
depthwise-like convolutions (where lanes would need different input channels) vectorize along the row. The
tiling is data (:class:`DirectTiling`, chosen by :func:`direct_tiling`) handed to the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tvm import s_tir, te, tirx

from fxquant.conv_geometry import ConvGeometry, DenseGeometry

__all__ = ["DirectKernel", "DirectTiling", "direct_conv2d", "direct_dense", "direct_tiling",
           "DIRECT_VERSION"]

#: bumped whenever the generated code changes (cached timings of older kernels are not reused)
DIRECT_VERSION = "direct-1"



@dataclass(frozen=True)
class DirectTiling:
    """How one direct layer is tiled (chosen by :func:`direct_tiling`, recorded in the manifest)."""

    layout: str  # "oc-vector": output channels in vector lanes; "row-vector": output columns in lanes
    lanes: int  # output channels per vector ("oc-vector"): one AVX2 register of int32/float32, two NEON ones
    row_tile: int  # output columns (dense: batch rows) per register tile

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: output channels per vector of the "oc-vector" layout
_LANES = 8
#: widest row (or batch) tile of accumulators: lanes x this many values stay in registers
_MAX_ROW_TILE = 8


def direct_tiling(geom: ConvGeometry | DenseGeometry) -> DirectTiling:
    """The tiling of ``geom``: vectors of output channels where every lane reads the same input channels (else
    of output columns), and the widest row tile that divides the output row (or the batch, for dense)."""
    if isinstance(geom, DenseGeometry):
        return DirectTiling("oc-vector", _LANES, _largest_divisor(geom.batch, _MAX_ROW_TILE))
    out_per_group = geom.out_channels // geom.groups
    width = geom.out_width
    if geom.groups == 1 or out_per_group % _LANES == 0:
        return DirectTiling("oc-vector", _LANES, _largest_divisor(width, _MAX_ROW_TILE))
    return DirectTiling("row-vector", 1, 8 if width % 8 == 0 else _largest_divisor(width, _MAX_ROW_TILE))


@dataclass(frozen=True)
class DirectKernel:
    """A scheduled PrimFunc ``(data, packed_weight, out)`` and how to pack a weight for it."""

    func: tirx.PrimFunc
    pack: Callable[[np.ndarray], np.ndarray]
    layout: str
    tiling: DirectTiling


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _pack_oc(weight: np.ndarray, block: int) -> np.ndarray:
    """(O, ...) -> (ceil(O/block), ..., block), zero-padding the last block."""
    out_ch = weight.shape[0]
    padded = -(-out_ch // block) * block
    if padded != out_ch:
        weight = np.concatenate([weight, np.zeros((padded - out_ch, *weight.shape[1:]), weight.dtype)])
    tiles = weight.reshape(padded // block, block, *weight.shape[1:])
    return np.ascontiguousarray(np.moveaxis(tiles, 1, -1))


def _padded_input(data: te.Tensor, geom: ConvGeometry, dtype: str) -> te.Tensor:
    top, left, bottom, right = geom.padding
    if not any(geom.padding):
        return data
    n, c, h, w = geom.input_shape
    zero = tirx.const(0, dtype)

    def value(b, ch, y, x):
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[b, ch, y - top, x - left], zero)

    return te.compute((n, c, h + top + bottom, w + left + right), value, name="pad")


def _conv_oc_vector(geom: ConvGeometry, tiling: DirectTiling, data_dtype: str, weight_dtype: str,
                    acc_dtype: str) -> DirectKernel:
    """Lanes = output channels of one group; the input value is a broadcast."""
    lanes = tiling.lanes
    n, _, _, _ = geom.input_shape
    out_ch, cin_g, kh, kw = geom.weight_shape
    oh, ow = geom.out_height, geom.out_width
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    tiles = -(-out_ch // lanes)
    out_per_group = out_ch // geom.groups
    data = te.placeholder(geom.input_shape, data_dtype, name="data")
    weight = te.placeholder((tiles, cin_g, kh, kw, lanes), weight_dtype, name="weight")
    pad = _padded_input(data, geom, data_dtype)
    rc = te.reduce_axis((0, cin_g), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")

    def acc_value(b, t, y, x, lane):
        base = (t * lanes) // out_per_group * cin_g if geom.groups > 1 else 0
        pixel = pad[b, base + rc, y * sh + ry * dh, x * sw + rx * dw].astype(acc_dtype)
        return te.sum(pixel * weight[t, rc, ry, rx, lane].astype(acc_dtype), axis=[rc, ry, rx])

    acc = te.compute((n, tiles, oh, ow, lanes), acc_value, name="acc")
    out = te.compute(geom.output_shape, lambda b, o, y, x: acc[b, o // lanes, y, x, o % lanes], name="out")
    sch = s_tir.Schedule(te.create_prim_func([data, weight, out]))
    acc_b, out_b = sch.get_sblock("acc"), sch.get_sblock("out")
    b, t, y, x, lane, c, ky, kx = sch.get_loops(acc_b)
    xo, xi = sch.split(x, [None, tiling.row_tile])
    sch.reorder(b, t, y, xo, c, ky, kx, xi, lane)
    sch.parallel(sch.fuse(b, t, y))
    sch.reverse_compute_at(out_b, xo)
    sch.set_scope(acc_b, 0, "local")
    sch.vectorize(lane)
    sch.unroll(xi)
    init = sch.decompose_reduction(acc_b, c)
    sch.vectorize(sch.get_loops(init)[-1])
    _schedule_pad(sch)
    pack = lambda w: _pack_oc(w, lanes).astype(weight_dtype)  # noqa: E731
    return DirectKernel(sch.mod["main"], pack, "oc-vector", tiling)


def _conv_row_vector(geom: ConvGeometry, tiling: DirectTiling, data_dtype: str, weight_dtype: str,
                     acc_dtype: str) -> DirectKernel:
    """Lanes = output columns; each output channel reads its own input channels (depthwise and odd groups)."""
    out_ch, cin_g, kh, kw = geom.weight_shape
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    out_per_group = out_ch // geom.groups
    data = te.placeholder(geom.input_shape, data_dtype, name="data")
    weight = te.placeholder(geom.weight_shape, weight_dtype, name="weight")
    pad = _padded_input(data, geom, data_dtype)
    rc = te.reduce_axis((0, cin_g), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")

    def out_value(b, o, y, x):
        pixel = pad[b, o // out_per_group * cin_g + rc, y * sh + ry * dh, x * sw + rx * dw].astype(acc_dtype)
        return te.sum(pixel * weight[o, rc, ry, rx].astype(acc_dtype), axis=[rc, ry, rx])

    out = te.compute(geom.output_shape, out_value, name="acc")
    sch = s_tir.Schedule(te.create_prim_func([data, weight, out]))
    acc_b = sch.get_sblock("acc")
    b, o, y, x, c, ky, kx = sch.get_loops(acc_b)
    width = tiling.row_tile
    xo, xi = sch.split(x, [None, width])
    sch.reorder(b, o, y, xo, c, ky, kx, xi)
    sch.parallel(sch.fuse(b, o, y))
    local = sch.cache_write(acc_b, 0, "local")
    sch.reverse_compute_at(local, xo)
    vectorized = sw == 1 and width in (4, 8)
    if vectorized:
        sch.vectorize(xi)
    else:
        sch.unroll(xi)
    init = sch.decompose_reduction(acc_b, c)
    if vectorized:
        sch.vectorize(sch.get_loops(init)[-1])
    _schedule_pad(sch)
    return DirectKernel(sch.mod["main"], lambda w: np.ascontiguousarray(w.astype(weight_dtype)), "row-vector",
                        tiling)


def _schedule_pad(sch: s_tir.Schedule) -> None:
    try:
        pad = sch.get_sblock("pad")
    except Exception:  # no padding block: the kernel reads its input directly
        return
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(loops[0], loops[1]))


def direct_conv2d(geom: ConvGeometry, data_dtype: str, weight_dtype: str, acc_dtype: str,
                  tiling: DirectTiling | None = None) -> DirectKernel:
    """Scheduled conv2d ``(data NCHW, packed weight, out NCHW)``; weights are packed by ``kernel.pack``.

    Example::

        k = direct_conv2d(geom, "int32", "int8", "int32")   # exact int32 accumulation of integer codes
    """
    tiling = tiling or direct_tiling(geom)
    build = _conv_oc_vector if tiling.layout == "oc-vector" else _conv_row_vector
    return build(geom, tiling, data_dtype, weight_dtype, acc_dtype)


def direct_dense(geom: DenseGeometry, data_dtype: str, weight_dtype: str, acc_dtype: str,
                 tiling: DirectTiling | None = None) -> DirectKernel:
    """Scheduled dense ``(data (N, K), packed weight, out (N, O))``.

    Example::

        k = direct_dense(DenseGeometry(2, 512, 10), "int32", "int8", "int32")
    """
    tiling = tiling or direct_tiling(geom)
    lanes = tiling.lanes
    n, k, out_f = geom.batch, geom.in_features, geom.out_features
    tiles = -(-out_f // lanes)
    data = te.placeholder((n, k), data_dtype, name="data")
    weight = te.placeholder((tiles, k, lanes), weight_dtype, name="weight")
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute(
        (n, tiles, lanes),
        lambda b, t, lane: te.sum(data[b, rk].astype(acc_dtype) * weight[t, rk, lane].astype(acc_dtype), axis=[rk]),
        name="acc",
    )
    out = te.compute((n, out_f), lambda b, o: acc[b, o // lanes, o % lanes], name="out")
    sch = s_tir.Schedule(te.create_prim_func([data, weight, out]))
    acc_b, out_b = sch.get_sblock("acc"), sch.get_sblock("out")
    b, t, lane, r = sch.get_loops(acc_b)
    bo, bi = sch.split(b, [None, tiling.row_tile])
    sch.reorder(t, bo, r, bi, lane)
    if tiles > 1:
        sch.parallel(t)
    sch.reverse_compute_at(out_b, bo)
    sch.set_scope(acc_b, 0, "local")
    sch.vectorize(lane)
    sch.unroll(bi)
    init = sch.decompose_reduction(acc_b, r)
    sch.vectorize(sch.get_loops(init)[-1])
    pack = lambda w: _pack_oc(w, lanes).astype(weight_dtype)  # noqa: E731
    return DirectKernel(sch.mod["main"], pack, "oc-vector", tiling)
