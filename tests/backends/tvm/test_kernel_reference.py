"""Every fast kernel family equals the TE statement of its math (``kernels/reference.py``), bit for bit.

The references are anchored once against the torch integer layers (``IntegerLayer.accumulate`` and the offset
accumulator); the fast kernels are then compared with them on small layers: odd channel counts, stride 2,
padding, dilation, groups and depthwise (``direct``), dense layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm.target.codegen import llvm_cpu_has_features

from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.direct import direct_conv2d, direct_dense
from fxquant.backends.tvm.kernels.bitserial import conv2d_primfunc, dense_primfunc, pack_weights, select_isa
from fxquant.backends.tvm.kernels.dot import DOT_ISAS, dot_conv2d, dot_dense, dot_tiling
from fxquant.backends.tvm.kernels.reference import (
    reference_bitserial,
    reference_conv2d,
    reference_dense,
    reference_offset,
)
from fxquant.conv_geometry import ConvGeometry, DenseGeometry, conv_geometry
from fxquant.integer import IntegerConv2d, IntegerLinear
from fxquant.quantizers.grid import encoding_mult_zero

HOST = make_target(host_target_dict(), None)
BASELINE = tvm.target.Target({"kind": "llvm"})  # x86-64 without AVX2: the portable bit-serial kernel
HOST_AVX2 = bool(llvm_cpu_has_features(["avx2"], HOST))

# (input NCHW, weight OIHW, stride, padding, dilation, groups)
ODD_STRIDED = ((1, 13, 7, 7), (11, 13, 3, 3), 2, 1, 1, 1)  # odd channels, stride 2, padding
TWO_WORDS = ((1, 70, 5, 6), (9, 70, 3, 3), 1, "same", 1, 1)  # two 64-bit words, a rectangular image
DEPTHWISE = ((1, 8, 7, 7), (8, 1, 3, 3), 2, 1, 1, 8)
GROUPED = ((1, 16, 6, 6), (16, 4, 3, 3), 1, 2, 2, 4)  # groups and dilation
DENSE = DenseGeometry(2, 37, 19)


def _geom(case) -> ConvGeometry:
    return conv_geometry(*case)


def _codes(shape: tuple[int, ...], bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, shape).astype(np.int32)


def _weights(codes: np.ndarray, bits: int, encoding: str) -> np.ndarray:
    mult, zero = encoding_mult_zero(encoding, bits)
    return (mult * codes.astype(np.int64) + zero).astype(np.int32)


def _run(func: tvm.tirx.PrimFunc, target: tvm.target.Target, *arrays: np.ndarray, out_shape) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    out = tvm.runtime.tensor(np.full(out_shape, 7777, np.int32))  # not zero: every element must be written
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


def _layer(geom: ConvGeometry | DenseGeometry, weight_codes: np.ndarray, wb: int, ab: int, encoding: str,
           case=None, input_low: float = 0.0) -> IntegerConv2d | IntegerLinear:
    codes = torch.from_numpy(weight_codes.astype(np.int64))
    common = dict(weight_int=torch.from_numpy(_weights(weight_codes, wb, encoding)), weight_codes=codes,
                  weight_scale=torch.ones(codes.shape[0]), bias=None, weight_bits=wb, weight_encoding=encoding,
                  act_bits=ab, input_low=torch.tensor(input_low), input_step=torch.tensor(1.0))
    if isinstance(geom, DenseGeometry):
        return IntegerLinear(**common)
    _, _, stride, padding, dilation, groups = case
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    return IntegerConv2d(**common, stride=pair(stride), padding=padding if isinstance(padding, str) else pair(padding),
                         dilation=pair(dilation), groups=groups)


@pytest.mark.parametrize("encoding", ["bipolar", "unsigned", "signed"])
def test_references_equal_the_torch_integer_layers(encoding: str) -> None:
    """Integer form, bit-serial form and offset accumulator against ``IntegerLayer`` (the numerics contract)."""
    geom = _geom(ODD_STRIDED)
    wcodes = _codes(geom.weight_shape, 2, seed=1)
    layer = _layer(geom, wcodes, 2, 3, encoding, ODD_STRIDED, input_low=-0.5)
    x = _codes(geom.input_shape, 3, seed=2)
    want = layer.accumulate(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(reference_conv2d(geom, x, _weights(wcodes, 2, encoding)), want)
    np.testing.assert_array_equal(reference_bitserial(geom, 3, 2, encoding, x, wcodes), want)
    offset = layer.offset_accumulator(torch.zeros((1, *geom.input_shape[1:]))).numpy()
    np.testing.assert_array_equal(reference_offset(geom, _weights(wcodes, 2, encoding)), offset)
    if encoding == "bipolar":
        dense_codes = _codes((DENSE.out_features, DENSE.in_features), 3, seed=3)
        dense = _layer(DENSE, dense_codes, 3, 2, encoding)
        xd = _codes(DENSE.input_shape, 2, seed=4)
        want = dense.accumulate(torch.from_numpy(xd)).numpy()
        np.testing.assert_array_equal(reference_dense(DENSE, xd, _weights(dense_codes, 3, encoding)), want)
        np.testing.assert_array_equal(reference_bitserial(DENSE, 2, 3, encoding, xd, dense_codes), want)


BITSERIAL_CASES = [
    pytest.param(ODD_STRIDED, 2, 3, "bipolar", id="W2A3-bipolar-odd-strided"),
    pytest.param(TWO_WORDS, 1, 2, "unsigned", id="W1A2-unsigned-70ch-same"),
    pytest.param(DENSE, 3, 2, "bipolar", id="W3A2-bipolar-dense"),
]


@pytest.mark.parametrize("target", ["host", "portable"])
@pytest.mark.parametrize("case,wb,ab,encoding", BITSERIAL_CASES)
def test_bitserial_equals_its_reference(target: str, case, wb: int, ab: int, encoding: str) -> None:
    tgt = HOST if target == "host" else BASELINE
    if target == "host" and select_isa(HOST).name == select_isa(BASELINE).name:
        pytest.skip("this host's bit-serial kernel is the portable one")
    geom = case if isinstance(case, DenseGeometry) else _geom(case)
    wcodes = _codes(geom.weight_shape if isinstance(geom, ConvGeometry) else (geom.out_features, geom.in_features),
                    wb, seed=5)
    layer = _layer(geom, wcodes, wb, ab, encoding, case).frozen  # the kernels read the data-only description
    x = _codes(geom.input_shape, ab, seed=6)
    build = dense_primfunc if isinstance(geom, DenseGeometry) else conv2d_primfunc
    got = _run(build(layer, geom.input_shape, tgt), tgt, x, pack_weights(layer), out_shape=geom.output_shape)
    np.testing.assert_array_equal(got, reference_bitserial(geom, ab, wb, encoding, x, wcodes))


DOT_CASES = [
    pytest.param("avx2-u8s8", ODD_STRIDED, (0, 15), (-15, 15), id="avx2-u8s8-chain-odd-strided"),
    pytest.param("avx2-u8s8", TWO_WORDS, (0, 3), (-3, 3), id="avx2-u8s8-chain-70ch"),
    pytest.param("avx2", ODD_STRIDED, (0, 255), (-255, 255), id="avx2-odd-strided"),
    pytest.param("avx2", DENSE, (0, 255), (-128, 127), id="avx2-dense"),
    pytest.param("generic", TWO_WORDS, (0, 255), (-128, 127), id="generic-70ch"),
    pytest.param("generic", DENSE, (0, 255), (-255, 255), id="generic-dense"),
]


@pytest.mark.parametrize("isa,case,data_range,weight_range", DOT_CASES)
def test_dot_equals_the_reference(isa: str, case, data_range, weight_range) -> None:
    if isa.startswith("avx2") and not HOST_AVX2:
        pytest.skip("this host has no AVX2")
    rng = np.random.default_rng(7)
    dense = isinstance(case, DenseGeometry)
    geom = case if dense else _geom(case)
    w_shape = (geom.out_features, geom.in_features) if dense else geom.weight_shape
    x = rng.integers(data_range[0], data_range[1] + 1, geom.input_shape).astype(np.int32)
    w = rng.integers(weight_range[0], weight_range[1] + 1, w_shape).astype(np.int32)
    x.flat[0], w.flat[0] = data_range[1], weight_range[0]  # an extreme pair in every case
    conv = geom.as_conv() if dense else geom
    tiling = dot_tiling(conv, DOT_ISAS[isa], data_range, weight_range)
    kernel = (dot_dense if dense else dot_conv2d)(geom, DOT_ISAS[isa], tiling)
    got = _run(kernel.func, HOST, x, kernel.pack(w.astype(np.int64)), out_shape=geom.output_shape)
    want = reference_dense(geom, x, w) if dense else reference_conv2d(geom, x, w)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", [ODD_STRIDED, DEPTHWISE, GROUPED, DENSE],
                         ids=["odd-strided", "depthwise", "grouped-dilated", "dense"])
def test_direct_equals_the_reference(case) -> None:
    rng = np.random.default_rng(8)
    dense = isinstance(case, DenseGeometry)
    geom = case if dense else _geom(case)
    w_shape = (geom.out_features, geom.in_features) if dense else geom.weight_shape
    x = rng.integers(0, 256, geom.input_shape).astype(np.int32)
    w = rng.integers(-128, 128, w_shape).astype(np.int8)
    kernel = (direct_dense if dense else direct_conv2d)(geom, "int32", "int8", "int32")
    got = _run(kernel.func, HOST, x, kernel.pack(w), out_shape=geom.output_shape)
    want = reference_dense(geom, x, w.astype(np.int32)) if dense else reference_conv2d(geom, x, w.astype(np.int32))
    np.testing.assert_array_equal(got, want)
