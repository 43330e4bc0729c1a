"""What every integer kernel family computes, stated once in TE with TVM's default schedule: the reference the
tests compare the fast kernels against.

Integer form (what ``dot`` and ``direct`` compute, and what bit-serial computes by another route): activation
codes ``x`` (or codebook integers) times weight integers ``w_int``, over the zero-padded window, in int32::

    acc[n, o, y, x] = sum_{c, ky, kx} pad(x)[n, g(o) * C_g + c, y * sh + ky * dh, x * sw + kx * dw] * w[o, c, ky, kx]

with ``C_g = C / groups`` input channels per group and ``g(o) = o // (O / groups)``. An input grid that does not
start at zero adds ``input_low * offset`` after the kernel, with ``offset`` the same sum over an all-ones input
(:func:`offset_compute`; the rescale adds it, the kernels never see it).

Bit-serial form (what ``bitserial`` computes): a weight integer is ``w = m * c + z`` of its code ``c`` (``m, z``
from the encoding: unsigned ``(1, 0)``, bipolar ``(2, -(2^wb - 1))``, signed ``(1, -2^(wb-1))``), and both codes
are sums of bit planes, so with ``a_i`` / ``w_j`` the planes packed 64 channels to a ``uint64`` word::

    sum_c x * c = sum_{i < ab, j < wb} 2^(i + j) * sum_{ky, kx, word} popcount(a_i[...] & w_j[...])
    acc         = m * that + z * sum_{c, ky, kx} pad(x)

Both are built with ``te.compute`` alone (no schedule): slow, plainly correct scalar loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import tvm
from tvm import te, tirx

from fxquant.conv_geometry import ConvGeometry, DenseGeometry
from fxquant.quantizers.grid import encoding_mult_zero

from .layout import WORD_BITS, words_for

__all__ = [
    "conv2d_compute",
    "dense_compute",
    "offset_compute",
    "bitserial_compute",
    "reference_conv2d",
    "reference_dense",
    "reference_offset",
    "reference_bitserial",
]

Geometry = ConvGeometry | DenseGeometry


def _padded(data: te.Tensor, geom: ConvGeometry, name: str) -> te.Tensor:
    """``data`` with the geometry's zero padding (an ``if_then_else`` per read, no copy semantics implied)."""
    _, _, h, w = geom.input_shape
    top, left, bottom, right = geom.padding

    def value(n, c, y, x):
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        clamped_y, clamped_x = tirx.min(tirx.max(y - top, 0), h - 1), tirx.min(tirx.max(x - left, 0), w - 1)
        return tirx.if_then_else(inside, data[n, c, clamped_y, clamped_x], tirx.const(0, data.dtype))

    return te.compute((geom.batch, geom.in_channels, h + top + bottom, w + left + right), value, name=name)


def _window_sum(geom: ConvGeometry, term: Callable[..., tirx.PrimExpr], name: str) -> te.Tensor:
    """``out[n, o, y, x] = sum_{c, ky, kx} term(n, o, input channel, padded row, padded column, c, ky, kx)``."""
    _, cin_g, kh, kw = geom.weight_shape
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    out_per_group = geom.out_channels // geom.groups
    rc, ry, rx = te.reduce_axis((0, cin_g), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def value(n, o, y, x):
        channel = o // out_per_group * cin_g + rc
        return te.sum(term(n, o, channel, y * sh + ry * dh, x * sw + rx * dw, rc, ry, rx), axis=[rc, ry, rx])

    return te.compute(geom.output_shape, value, name=name)


def conv2d_compute(geom: ConvGeometry) -> list[te.Tensor]:
    """``(data int32 NCHW, weight int32 OIHW, acc int32 NCHW)``: the integer form, any groups."""
    data = te.placeholder(geom.input_shape, "int32", name="data")
    weight = te.placeholder(geom.weight_shape, "int32", name="weight")
    pad = _padded(data, geom, "pad")
    acc = _window_sum(geom, lambda n, o, ch, yy, xx, c, ky, kx: pad[n, ch, yy, xx] * weight[o, c, ky, kx], "acc")
    return [data, weight, acc]


def dense_compute(geom: DenseGeometry) -> list[te.Tensor]:
    """``(data int32 (N, K), weight int32 (O, K), acc int32 (N, O))``: the integer form of a dense layer."""
    data = te.placeholder(geom.input_shape, "int32", name="data")
    weight = te.placeholder((geom.out_features, geom.in_features), "int32", name="weight")
    rk = te.reduce_axis((0, geom.in_features), "rk")
    acc = te.compute(geom.output_shape, lambda n, o: te.sum(data[n, rk] * weight[o, rk], axis=[rk]), name="acc")
    return [data, weight, acc]


def offset_compute(geom: ConvGeometry) -> list[te.Tensor]:
    """``(weight int32 OIHW, offset int32 (1, O, OH, OW))``: the integer form on an all-ones input, i.e. the sum
    of the weights whose taps fall inside the image (padding taps read zero)."""
    weight = te.placeholder(geom.weight_shape, "int32", name="weight")
    ones = te.compute((1, *geom.input_shape[1:]), lambda *_: tirx.const(1, "int32"), name="ones")
    one = replace(geom, batch=1)
    pad = _padded(ones, one, "pad")
    offset = _window_sum(one, lambda n, o, ch, yy, xx, c, ky, kx: pad[n, ch, yy, xx] * weight[o, c, ky, kx], "offset")
    return [weight, offset]


def _bit_planes(codes: te.Tensor, bits: int, name: str) -> te.Tensor:
    """``planes[i, y, x, b, word]`` of 4-d codes ``[i, channel, y, x]``: bit ``k`` of the word is bit ``b`` of the
    code of channel ``64 word + k`` (zero past the channels)."""
    lead_n, channels, rows, cols = (int(d) for d in codes.shape)
    rk = te.reduce_axis((0, WORD_BITS), "rk")

    def value(i, y, x, b, word):
        channel = word * WORD_BITS + rk
        code = codes[i, tirx.min(channel, channels - 1), y, x].astype("uint64")
        bit = tirx.if_then_else(channel < channels, (code >> b.astype("uint64")) & tirx.const(1, "uint64"),
                                tirx.const(0, "uint64"))
        return te.sum(bit << rk.astype("uint64"), axis=[rk])  # distinct bits: the sum is their OR

    return te.compute((lead_n, rows, cols, bits, words_for(channels)), value, name=name)


def bitserial_compute(geom: ConvGeometry, act_bits: int, weight_bits: int, encoding: str) -> list[te.Tensor]:
    """``(codes int32 NCHW, weight_codes int32 OIHW, acc int32 NCHW)``: the bit-serial form (``groups == 1``)."""
    if geom.groups != 1:
        raise ValueError(f"the bit-serial form is stated for groups=1, got groups={geom.groups}")
    mult, zero = encoding_mult_zero(encoding, weight_bits)
    c_ = geom.in_channels
    _, _, kh, kw = geom.weight_shape
    codes = te.placeholder(geom.input_shape, "int32", name="codes")
    weight_codes = te.placeholder(geom.weight_shape, "int32", name="weight_codes")
    pad = _padded(codes, geom, "pad")
    a = _bit_planes(pad, act_bits, "a_planes")
    w = _bit_planes(weight_codes, weight_bits, "w_planes")
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    ri, rj = te.reduce_axis((0, act_bits), "ri"), te.reduce_axis((0, weight_bits), "rj")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    rw = te.reduce_axis((0, words_for(c_)), "rw")

    def counts(n, o, y, x):
        word = a[n, y * sh + ry * dh, x * sw + rx * dw, ri, rw] & w[o, ry, rx, rj, rw]
        return te.sum(tirx.popcount(word).astype("int32") << (ri + rj), axis=[ri, rj, ry, rx, rw])

    unsigned = te.compute(geom.output_shape, counts, name="unsigned_acc")
    if zero == 0 and mult == 1:
        return [codes, weight_codes, unsigned]
    window = _window_sum(geom, lambda n, o, ch, yy, xx, c, ky, kx: pad[n, ch, yy, xx], "code_sums")
    acc = te.compute(geom.output_shape, lambda *i: mult * unsigned[i] + zero * window[i], name="acc")
    return [codes, weight_codes, acc]


#: compiled references by (form, geometry, ...): each is built once per process
_BUILT: dict[tuple, tvm.runtime.Module] = {}


def _run(key: tuple, build: Callable[[], list[te.Tensor]], inputs: list[np.ndarray], out_shape: tuple) -> np.ndarray:
    if key not in _BUILT:
        func = te.create_prim_func(build()).with_attr("global_symbol", "main")
        _BUILT[key] = tvm.compile(func, target="llvm")
    lib = _BUILT[key]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32))
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(x, np.int32)) for x in inputs], out)
    return out.numpy()


def reference_conv2d(geom: ConvGeometry, data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The integer form run on ``data`` (NCHW codes) and ``weight`` (OIHW integers); built once per geometry."""
    return _run(("conv2d", geom), lambda: conv2d_compute(geom), [data, weight], geom.output_shape)


def reference_dense(geom: DenseGeometry, data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return _run(("dense", geom), lambda: dense_compute(geom), [data, weight], geom.output_shape)


def reference_offset(geom: ConvGeometry, weight: np.ndarray) -> np.ndarray:
    """The offset accumulator of one image (shape ``(1, O, OH, OW)``)."""
    return _run(("offset", geom), lambda: offset_compute(geom), [weight], (1, *geom.output_shape[1:]))


def reference_bitserial(geom: Geometry, act_bits: int, weight_bits: int, encoding: str, codes: np.ndarray,
                        weight_codes: np.ndarray) -> np.ndarray:
    """The bit-serial form on activation and weight *codes*; a dense layer runs as a 1x1 convolution."""
    dense = isinstance(geom, DenseGeometry)
    conv = geom.as_conv() if dense else geom
    if dense:
        codes, weight_codes = codes[:, :, None, None], weight_codes[:, :, None, None]
    key = ("bitserial", conv, act_bits, weight_bits, encoding)
    got = _run(key, lambda: bitserial_compute(conv, act_bits, weight_bits, encoding), [codes, weight_codes],
               conv.output_shape)
    return got[:, :, 0, 0] if dense else got
