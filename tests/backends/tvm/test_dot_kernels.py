"""Integer dot-product kernels: exact against the integer reference on a shape grid, per instruction choice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.direct import direct_dense
from fxquant.backends.tvm.kernels.dot import (
    DOT_ISAS,
    Chain,
    chain_plan,
    dot_conv2d,
    dot_dense,
    dot_isa_choices,
    dot_tiling,
    folds_kernel_columns,
    halved_weight,
    select_dot_isa,
    tile_width,
)
from fxquant.conv_geometry import DenseGeometry, conv_geometry

HOST = make_target(host_target_dict(), None)
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})  # AVX2 without AVX-512 VNNI
HOST_HAS_AVX2 = select_dot_isa(HOST, (0, 255), (-128, 127)).name in ("avx2", "avx512-vnni")
HOST_HAS_VNNI = select_dot_isa(HOST, (0, 255), (-128, 127)).name == "avx512-vnni"
RUNNABLE = ["generic"] + (["avx2"] if HOST_HAS_AVX2 else []) + (["avx512-vnni"] if HOST_HAS_VNNI else [])
needs_avx2 = pytest.mark.skipif(not HOST_HAS_AVX2, reason="this host has no AVX2")
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="this host has no AVX-512 VNNI")

# (input NCHW, weight OIHW, stride, padding, dilation): odd channels, stride 2, padding, 1x1, 7x7 stems, tails
SHAPES = [
    ((1, 13, 9, 9), (21, 13, 3, 3), 2, 1, 1),
    ((2, 8, 7, 7), (16, 8, 3, 3), 1, 1, 1),
    ((1, 3, 17, 17), (8, 3, 7, 7), 2, 3, 1),
    ((1, 32, 6, 6), (40, 32, 1, 1), 1, 0, 1),
    ((1, 16, 10, 11), (24, 16, 3, 3), 1, 2, 2),
    ((1, 5, 5, 5), (3, 5, 3, 3), 1, 0, 1),
    ((1, 24, 9, 9), (16, 24, 1, 1), 2, 0, 1),  # a downsample: windows that share no input pixel
]


def _run(kernel, x: np.ndarray, w: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")}), target=HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(kernel.pack(w)), out)
    return out.numpy().astype(np.int64)


def _conv_reference(x: np.ndarray, w: np.ndarray, stride: int, padding: int, dilation: int) -> np.ndarray:
    got = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=stride,
                                     padding=padding, dilation=dilation)
    return got.round().long().numpy()


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1][:1])))
def test_conv_equals_reference(isa: str, shape) -> None:
    in_shape, w_shape, stride, padding, dilation = shape
    geom = conv_geometry(in_shape, w_shape, stride, padding, dilation, 1)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, in_shape).astype(np.int32)
    w = rng.integers(-128, 128, w_shape).astype(np.int64)
    got = _run(dot_conv2d(geom, DOT_ISAS[isa]), x, w, geom.output_shape)
    np.testing.assert_array_equal(got, _conv_reference(x, w, stride, padding, dilation))


@pytest.mark.parametrize("isa", RUNNABLE)
def test_extreme_codes_do_not_saturate(isa: str) -> None:
    """255 x -128 and 255 x 127 everywhere: every pair sum that an int16 accumulation would saturate."""
    geom = conv_geometry((1, 16, 5, 5), (8, 16, 3, 3), 1, 1, 1, 1)
    x = np.full(geom.input_shape, 255, np.int32)
    for value in (-128, 127):
        w = np.full(geom.weight_shape, value, np.int64)
        got = _run(dot_conv2d(geom, DOT_ISAS[isa]), x, w, geom.output_shape)
        np.testing.assert_array_equal(got, _conv_reference(x, w, 1, 1, 1))
    assert int(got.max()) == 255 * 127 * 16 * 9


@pytest.mark.parametrize("isa", [name for name in RUNNABLE if DOT_ISAS[name].weight_dtype == "int16"])
def test_bipolar_eight_bit_weights_need_int16(isa: str) -> None:
    """Bipolar 8-bit weights reach ±255: only the 16-bit instruction choices hold them as they are (the halved
    VNNI kernel holds their halves, see test_halved_vnni_conv_equals_reference)."""
    assert not DOT_ISAS["avx512-vnni"].accepts((0, 255), (-255, 255))
    assert DOT_ISAS["avx512-vnni-halved"].accepts((0, 255), (-255, 255))
    assert not DOT_ISAS["neon-sdot"].accepts((0, 127), (-255, 255))
    geom = conv_geometry((1, 6, 4, 4), (5, 6, 3, 3), 1, 1, 1, 1)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, geom.input_shape).astype(np.int32)
    w = (2 * rng.integers(0, 256, geom.weight_shape) - 255).astype(np.int64)
    got = _run(dot_conv2d(geom, DOT_ISAS[isa]), x, w, geom.output_shape)
    np.testing.assert_array_equal(got, _conv_reference(x, w, 1, 1, 1))


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("batch,features,outputs", [(1, 512, 10), (3, 37, 19)])
def test_dense_equals_reference(isa: str, batch: int, features: int, outputs: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (batch, features)).astype(np.int32)
    w = rng.integers(-128, 128, (outputs, features)).astype(np.int64)
    got = _run(dot_dense(DenseGeometry(batch, features, outputs), DOT_ISAS[isa]), x, w, (batch, outputs))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.T)


@needs_avx2
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1][:1])))
def test_u8s8_chains_equal_reference(shape) -> None:
    """vpmaddubsw with int16 partial sums over a kernel row: exact for 4-bit codes and weights."""
    in_shape, w_shape, stride, padding, dilation = shape
    geom = conv_geometry(in_shape, w_shape, stride, padding, dilation, 1)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 16, in_shape).astype(np.int32)
    w = rng.choice(np.arange(-15, 16, 2), w_shape).astype(np.int64)  # bipolar 4-bit weights: odd, |w| <= 15
    got = _run(dot_conv2d(geom, DOT_ISAS["avx2-u8s8"]), x, w, geom.output_shape)
    np.testing.assert_array_equal(got, _conv_reference(x, w, stride, padding, dilation))


@needs_avx2
def test_u8s8_chain_at_its_int16_limit() -> None:
    """A 3x3 row of 16 channels is 12 steps of two products: 63 x 21 stays inside int16, 63 x 22 does not."""
    isa = DOT_ISAS["avx2-u8s8"]
    steps = isa.chain_steps(3, 16)
    assert steps == 12 and 12 * 2 * 63 * 21 <= 32767 < 12 * 2 * 63 * 22
    assert isa.accepts((0, 63), (-21, 21), steps) and not isa.accepts((0, 63), (-22, 22), steps)
    assert select_dot_isa(AVX2, (0, 63), (-22, 22), 3, 16).name == "avx2"  # the chain would wrap: 16-bit operands
    geom = conv_geometry((1, 16, 6, 6), (8, 16, 3, 3), 1, 1, 1, 1)
    x = np.full(geom.input_shape, 63, np.int32)
    for value in (-21, 21):
        w = np.full(geom.weight_shape, value, np.int64)
        got = _run(dot_conv2d(geom, isa), x, w, geom.output_shape)
        np.testing.assert_array_equal(got, _conv_reference(x, w, 1, 1, 1))
    assert int(np.abs(got).max()) == 63 * 21 * 16 * 9


def test_chain_plan_takes_the_longest_exact_chain() -> None:
    """Low-bit ranges chain whole windows of several channel blocks; 8-bit-wide ones fall back to a row."""
    isa = DOT_ISAS["avx2-u8s8"]
    geom = conv_geometry((1, 64, 8, 8), (16, 64, 3, 3), 1, 1, 1, 1)  # 4 blocks of 16 channels, 36 steps each
    assert chain_plan(geom, isa, (0, 15), (-8, 7)) == Chain(blocks=2, rows=3)  # 72 steps x 240 <= 32767 < 144
    assert chain_plan(geom, isa, (0, 3), (-2, 1)) == Chain(blocks=4, rows=3)
    assert chain_plan(geom, isa, (0, 63), (-21, 21)) == Chain()  # a window (36 steps) would wrap; a row fits
    assert chain_plan(geom, DOT_ISAS["avx2"], (0, 3), (-2, 1)) == Chain()  # int32 accumulation: nothing to chain


@needs_avx2
@pytest.mark.parametrize("ranges", [((0, 15), (-8, 7)), ((0, 3), (-2, 1)), ((0, 1), (-1, 1))])
def test_chained_conv_exact_at_extreme_codes(ranges) -> None:
    """Every code at its extreme through the longest chain the plan allows: no int16 lane wraps."""
    (alo, ahi), (wlo, whi) = ranges
    isa = DOT_ISAS["avx2-u8s8"]
    geom = conv_geometry((1, 64, 5, 6), (24, 64, 3, 3), 1, 1, 1, 1)
    tiling = dot_tiling(geom, isa, (alo, ahi), (wlo, whi))
    chain = tiling.chain
    assert chain.rows == 3 and chain.blocks >= 2
    rng = np.random.default_rng(5)
    x = np.full(geom.input_shape, ahi, np.int32)
    for w in (np.full(geom.weight_shape, wlo, np.int64), np.full(geom.weight_shape, whi, np.int64),
              rng.integers(wlo, whi + 1, geom.weight_shape)):
        got = _run(dot_conv2d(geom, isa, tiling), x, w, geom.output_shape)
        np.testing.assert_array_equal(got, _conv_reference(x, w, 1, 1, 1))
    x = rng.integers(alo, ahi + 1, geom.input_shape).astype(np.int32)
    got = _run(dot_conv2d(geom, isa, tiling), x, w, geom.output_shape)
    np.testing.assert_array_equal(got, _conv_reference(x, w, 1, 1, 1))


@pytest.mark.parametrize("isa", ["avx2", "avx2-u8s8"])
def test_folded_kernel_columns_exact_at_extreme_codes(isa: str) -> None:
    """A stem (3 channels x 7 columns folded into one block of 21 values): every extreme code pairing, odd
    widths and both paddings, equal to the reference; wide layers and dilated ones are not folded."""
    if not HOST_HAS_AVX2:
        pytest.skip("this host has no AVX2")
    geom = conv_geometry((1, 3, 15, 13), (10, 3, 7, 7), 2, 3, 1, 1)
    assert folds_kernel_columns(geom, DOT_ISAS[isa])
    assert not folds_kernel_columns(conv_geometry((1, 64, 8, 8), (8, 64, 3, 3), 1, 1, 1, 1), DOT_ISAS[isa])
    assert not folds_kernel_columns(conv_geometry((1, 3, 15, 13), (8, 3, 3, 3), 1, 2, 2, 1), DOT_ISAS[isa])
    (alo, ahi), (wlo, whi) = ((0, 255), (-128, 127)) if isa == "avx2" else ((0, 15), (-8, 7))
    rng = np.random.default_rng(6)
    for x, w in ((np.full(geom.input_shape, ahi, np.int32), np.full(geom.weight_shape, wlo, np.int64)),
                 (np.full(geom.input_shape, ahi, np.int32), np.full(geom.weight_shape, whi, np.int64)),
                 (rng.integers(alo, ahi + 1, geom.input_shape).astype(np.int32),
                  rng.integers(wlo, whi + 1, geom.weight_shape))):
        got = _run(dot_conv2d(geom, DOT_ISAS[isa], dot_tiling(geom, DOT_ISAS[isa], (alo, ahi), (wlo, whi))), x, w,
                   geom.output_shape)
        np.testing.assert_array_equal(got, _conv_reference(x, w, 2, 3, 1))


def test_isa_choice_follows_target_and_ranges() -> None:
    zen4 = make_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, None)
    zen3 = make_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, None)
    a76 = make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, None)
    a72 = make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, None)
    assert select_dot_isa(zen4, (0, 255), (-128, 127)).name == "avx512-vnni"
    assert select_dot_isa(zen4, (0, 255), (-255, 255)).name == "avx2"  # int8 weights cannot hold ±255
    assert select_dot_isa(zen4, (0, 255), (-255, 255), odd_weights=True).name == "avx512-vnni-halved"
    assert select_dot_isa(zen4, (0, 255), (-256, 255), odd_weights=True).name == "avx2"  # halves beyond int8
    assert select_dot_isa(zen3, (0, 255), (-255, 255), odd_weights=True).name == "avx2"
    # the lowering costs the halved kernel against the next choice (its extra passes can outweigh it)
    names = [isa.name for isa in dot_isa_choices(zen4, (0, 255), (-255, 255), 3, 64, odd_weights=True)]
    assert names == ["avx512-vnni-halved", "avx2", "generic"]
    assert select_dot_isa(zen3, (0, 255), (-128, 127)).name == "avx2"  # 255 x 127 pairs overflow int16
    assert select_dot_isa(zen3, (0, 15), (-15, 15), 3, 64).name == "avx2-u8s8"
    assert select_dot_isa(a76, (0, 127), (-128, 127)).name == "neon-sdot"
    assert select_dot_isa(a76, (0, 255), (-128, 127)).name == "neon"  # 8-bit codes do not fit int8
    assert select_dot_isa(a72, (0, 15), (-8, 7)).name == "neon"


def _assembly(func, target) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")


@pytest.mark.parametrize(
    "isa,target,instruction",
    [
        ("avx512-vnni", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, "vpdpbusd"),
        ("avx512-vnni-halved", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, "vpdpbusd"),
        ("avx2", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, "vpmaddwd"),
        ("avx2-u8s8", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, "vpmaddubsw"),
        ("neon-sdot", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "sdot"),
        ("neon", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "smlal"),
    ],
)
def test_generated_code_uses_the_instruction(isa: str, target: dict, instruction: str) -> None:
    """The instruction each choice is named for is in the code (for targets this host cannot run)."""
    geom = conv_geometry((1, 16, 6, 6), (32, 16, 3, 3), 1, 1, 1, 1)
    asm = _assembly(dot_conv2d(geom, DOT_ISAS[isa]).func, make_target(target, None))
    assert instruction in asm


def test_tile_width_leaves_no_partial_tile_where_it_can() -> None:
    """ResNet's widths take 7-pixel tiles on AVX-512 VNNI (6 left a 1-2 pixel tail tile on every row)."""
    assert [tile_width(w, 7) for w in (112, 56, 28, 14, 7)] == [7, 7, 7, 7, 7]
    assert tile_width(30, 7) == 6 and tile_width(5, 7) == 5  # 5 tiles of 6 beat 5 of 7; narrow rows: one tile
    assert tile_width(14, 4) == 3 and tile_width(56, 4) == 4  # 5 tiles of 3 (15 pixels) beat 4 of 4 (16)
    geom = conv_geometry((1, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1, 1)
    assert dot_tiling(geom, DOT_ISAS["avx512-vnni"], (0, 15), (-15, 15)).tile_w == 7


def _odd_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """8-bit bipolar weights: every odd integer from -255 to 255, both extremes present."""
    w = 2 * rng.integers(0, 256, shape) - 255
    w.flat[0], w.flat[-1] = 255, -255
    return w.astype(np.int64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1][:1])))
def test_halved_weights_and_window_sums_give_the_sum(shape) -> None:
    """The identity the halved kernel relies on, for every geometry: sum a w = 2 sum a (w - 1) / 2 + sum a."""
    in_shape, w_shape, stride, padding, dilation = shape
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, in_shape).astype(np.int32)
    w = _odd_weights(rng, w_shape)
    window = _conv_reference(x, np.ones((1, *w_shape[1:]), np.int64), stride, padding, dilation)
    halved = _conv_reference(x, halved_weight(w), stride, padding, dilation)
    np.testing.assert_array_equal(2 * halved + window, _conv_reference(x, w, stride, padding, dilation))
    assert halved_weight(w).min() >= -128 and halved_weight(w).max() <= 127
    with pytest.raises(ValueError, match="odd weights"):
        halved_weight(w + 1)


@needs_vnni
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1][:1])))
def test_halved_vnni_conv_equals_reference(shape) -> None:
    """8-bit bipolar weights (+-255) on vpdpbusd: random codes, then 255 against +-255 everywhere."""
    in_shape, w_shape, stride, padding, dilation = shape
    geom = conv_geometry(in_shape, w_shape, stride, padding, dilation, 1)
    isa = DOT_ISAS["avx512-vnni-halved"]
    rng = np.random.default_rng(5)
    cases = [(rng.integers(0, 256, in_shape).astype(np.int32), _odd_weights(rng, w_shape))]
    cases += [(np.full(in_shape, 255, np.int32), np.full(w_shape, value, np.int64)) for value in (-255, 255)]
    for x, w in cases:
        kernel = dot_conv2d(geom, isa, dot_tiling(geom, isa, (0, 255), (-255, 255)))
        got = _run(kernel, x, w, geom.output_shape)
        np.testing.assert_array_equal(got, _conv_reference(x, w, stride, padding, dilation))


@needs_vnni
def test_halved_vnni_dense_equals_reference() -> None:
    geom = DenseGeometry(3, 70, 19)
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, geom.input_shape).astype(np.int32)
    w = _odd_weights(rng, (19, 70))
    got = _run(dot_dense(geom, DOT_ISAS["avx512-vnni-halved"]), x, w, geom.output_shape)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.T)


#: value ranges each instruction choice is exact for (``avx2-u8s8``: 4-bit codes and odd weights, an int16 chain)
EXACT_RANGES = {
    "generic": ((0, 255), (-128, 127)),
    "avx2": ((0, 255), (-128, 127)),
    "avx2-u8s8": ((0, 15), (-15, 15)),
    "avx512-vnni": ((0, 255), (-128, 127)),
    "avx512-vnni-halved": ((0, 255), (-255, 255)),
}
TINY = ["generic"] + (["avx2", "avx2-u8s8"] if HOST_HAS_AVX2 else []) + (
    ["avx512-vnni", "avx512-vnni-halved"] if HOST_HAS_VNNI else [])


@pytest.mark.parametrize("isa", TINY)
@pytest.mark.parametrize("outputs", [1, 2, 3, 5])
def test_tiny_dense_equals_reference(isa: str, outputs: int) -> None:
    """Fewer outputs than one accumulator vector (Swin v2's position-bias MLP ends in one per head): the lanes
    past ``outputs`` are zero padding and never stored. Both layers of that MLP (2 -> 512 -> heads shaped),
    built for an AVX2-only CPU where the choice is an AVX2 one, random and extreme codes."""
    choice = DOT_ISAS[isa]
    (alo, ahi), (wlo, whi) = EXACT_RANGES[isa]
    target = AVX2 if isa.startswith("avx2") else HOST
    rng = np.random.default_rng(outputs)
    for features in (2, 512):
        geom = DenseGeometry(49, features, outputs)
        kernel = dot_dense(geom, choice, dot_tiling(geom, choice, (alo, ahi), (wlo, whi)))
        assert kernel.func.attrs["fxquant.dot_isa"] == isa
        lib = tvm.compile(tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")}), target=target)
        odd = choice.halved or choice.chain16
        weights = rng.integers(wlo // 2, whi // 2 + 1, (outputs, features)) * 2 + 1 if odd else \
            rng.integers(wlo, whi + 1, (outputs, features))
        cases = [(rng.integers(alo, ahi + 1, geom.input_shape), weights)]
        cases += [(np.full(geom.input_shape, ahi), np.full((outputs, features), w)) for w in (wlo, whi)]
        for x, w in cases:
            out = tvm.runtime.tensor(np.zeros(geom.output_shape, np.int32))
            lib(tvm.runtime.tensor(x.astype(np.int32)), tvm.runtime.tensor(kernel.pack(w.astype(np.int64))), out)
            np.testing.assert_array_equal(out.numpy().astype(np.int64), x.astype(np.int64) @ w.T.astype(np.int64))


def fold_dense(kernel, geom: DenseGeometry, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``kernel`` on constant operands through Relax's FoldConstant under the host target, as ``compile_module``
    runs it: the value it folds to."""
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            gv = bb.add_func(kernel.func, "kernel")
            args = [relax.const(x.astype(np.int32)), relax.const(kernel.pack(w))]
            out = bb.emit_output(bb.emit(relax.call_tir(gv, args, relax.TensorType(geom.output_shape, "int32"))))
        bb.emit_func_output(out)
    with HOST:
        folded = relax.transform.FoldConstant()(bb.get())
    return folded["main"].body.body.value.numpy()


_FOLD_DOT = """
import numpy as np
from fxquant.backends.tvm.kernels.dot import DOT_ISAS, dot_dense
from fxquant.conv_geometry import DenseGeometry
from tests.backends.tvm.test_dot_kernels import fold_dense
geom = DenseGeometry(4, 8, 3)
fold_dense(dot_dense(geom, DOT_ISAS[{isa!r}]), geom, np.ones((4, 8)), np.ones((3, 8), np.int64))
print("folded")
"""


@needs_avx2
def test_constant_folding_compiles_for_a_generic_cpu() -> None:
    """Why a layer with a build-time constant input gets the direct kernel only (integer_layers.CONSTANT_INPUT):
    FoldConstant compiles what it folds for plain ``llvm`` whatever the target, and LLVM aborts the process on
    the dot instructions there (Swin v2's position-bias MLP). The direct kernel folds. Should the x86 dot
    choice fold one day, that restriction can go."""
    geom = DenseGeometry(4, 8, 3)
    rng = np.random.default_rng(7)
    x, w = rng.integers(0, 256, geom.input_shape), rng.integers(-128, 128, (3, 8))
    np.testing.assert_array_equal(fold_dense(direct_dense(geom, "int32", "int8", "int32"), geom, x, w), x @ w.T)
    isa = select_dot_isa(HOST, (0, 255), (-128, 127)).name
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", _FOLD_DOT.format(isa=isa)], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "folded" not in done.stdout
    assert "LLVM ERROR" in done.stderr
