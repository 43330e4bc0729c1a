"""AVX-512 VPOPCNTDQ bit-serial kernel: selection, the instructions it compiles to, and exact accumulators.

Hosts without AVX-512 still run the kernel's loop nest: compiled for Zen 3, LLVM splits every 512-bit vector
into AVX2 halves and looks the 64-bit popcounts up by nibble, so the same arithmetic is checked bit-exact.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from fxquant.backends.tvm.kernels import conv2d_primfunc, dense_primfunc, pack_weights
from fxquant.backends.tvm.kernels.bitserial import conv_geometry, dense_geometry, select_isa
from fxquant.backends.tvm.kernels.microkernel import Tiling, build_bitserial
from fxquant.backends.tvm.kernels.schedule_x86 import Avx512PopcntIsa
from fxquant.integer import accumulate
from tests.backends.tvm.test_bitserial import _random_codes, _run, check_conv, check_dense, make_conv, make_dense

ZNVER4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
ZNVER3 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"})
AVX512_NAME = Avx512PopcntIsa.name


def _host_has_vpopcntdq() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and re.search(r"\bavx512_vpopcntdq\b", cpuinfo.read_text()) is not None


HOST_VPOPCNTDQ = _host_has_vpopcntdq()


def _asm(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")


# --- selection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mcpu", ["znver4", "icelake-server", "sapphirerapids"])
def test_vpopcntdq_cpus_select_avx512(mcpu):
    assert select_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}).name == AVX512_NAME


@pytest.mark.parametrize("mcpu", ["znver3", "skylake-avx512"])  # skylake-avx512: AVX-512F but no VPOPCNTDQ
def test_cpus_without_vpopcntdq_keep_avx2(mcpu):
    assert select_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}).name == "x86-avx2"


def test_selection_by_attributes():
    features = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx512f", "+avx512vpopcntdq"]}
    assert select_isa(features).name == AVX512_NAME
    assert select_isa({"kind": "llvm"}).name == "generic-llvm"


# --- generated code ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mcpu", ["znver4", "icelake-server"])  # Ice Lake's LLVM tuning prefers 256-bit vectors
def test_kernel_uses_vpopcntq_on_zmm(mcpu):
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    layer = make_conv(16, 128, 3, 2, 2, "bipolar")
    func = conv2d_primfunc(layer, (1, 128, 14, 14), target)
    assert func.attrs["fxquant.bitserial_isa"] == AVX512_NAME
    asm = _asm(func, target)
    assert re.search(r"vpopcntq\s+%zmm\d+, %zmm\d+", asm)
    assert re.search(r"vpandq\s+.*%zmm\d+", asm)
    assert "vpshufb" not in asm


def test_znver4_dense_kernel_uses_vpopcntq():
    layer = make_dense(16, 512, 1, 1, "bipolar")
    asm = _asm(dense_primfunc(layer, (2, 512), ZNVER4), ZNVER4)
    assert re.search(r"vpopcntq\s+%zmm\d+, %zmm\d+", asm) and "vpshufb" not in asm


@pytest.mark.parametrize("width,tile", [(1, 1), (7, 7), (14, 14), (15, 8), (28, 14), (32, 11), (56, 14)])
def test_tiles_split_rows_evenly(width, tile):
    layer = make_conv(8, 64, 3, 1, 1, "bipolar")
    geom = conv_geometry(layer, (1, 64, width, width))
    assert Avx512PopcntIsa().tiling(geom) == Tiling(tile_w=tile, vec_blocks=1)


# --- exactness through the legalized (AVX2) build ----------------------------------------------------------------


def _check_conv_legalized(layer, shape: tuple[int, int, int, int], tiling: Tiling | None = None) -> None:
    isa = Avx512PopcntIsa()
    geom = conv_geometry(layer, shape)
    func = build_bitserial(geom, isa, tiling or isa.tiling(geom))
    codes = _random_codes(shape, layer.act_bits)
    expected = accumulate(layer, codes).numpy()
    got = _run(func, ZNVER3, codes, pack_weights(layer), expected.shape)
    np.testing.assert_array_equal(got.astype(np.int64), expected)


# (out_c, in_c, k, wb, ab, encoding, stride, pad, image size)
LEGALIZED_CONV_CASES = [
    pytest.param(16, 64, 3, 1, 1, "bipolar", 1, 1, 9, id="W1A1-bipolar-3x3-s1p1-64ch"),
    pytest.param(13, 70, 3, 2, 3, "bipolar", 2, 1, 9, id="W2A3-bipolar-3x3-s2p1-70ch-13out"),
    pytest.param(9, 33, 3, 4, 4, "unsigned", 1, 0, 8, id="W4A4-unsigned-3x3-s1p0-33ch-9out"),
    pytest.param(8, 100, 1, 2, 3, "unsigned", 2, 0, 9, id="W2A3-unsigned-1x1-s2-100ch"),
    pytest.param(11, 130, 3, 1, 1, "unsigned", 1, 1, 17, id="W1A1-unsigned-130ch-tile-with-tail"),
    pytest.param(24, 45, 5, 4, 4, "bipolar", 2, 2, 11, id="W4A4-bipolar-5x5-s2p2-45ch"),
    pytest.param(8, 2100, 1, 1, 2, "bipolar", 1, 0, 3, id="W1A2-bipolar-2100ch-33-words"),
]


@pytest.mark.parametrize("out_c,in_c,k,wb,ab,encoding,stride,pad,size", LEGALIZED_CONV_CASES)
def test_conv_matches_reference(out_c, in_c, k, wb, ab, encoding, stride, pad, size):
    layer = make_conv(out_c, in_c, k, wb, ab, encoding, stride, pad)
    _check_conv_legalized(layer, (1, in_c, size, size))


@pytest.mark.parametrize("tile_w", [1, 3, 14])
def test_conv_any_tile_matches_reference(tile_w):
    """Tiles other than the chosen one, with tails, over a batch and a rectangular image."""
    layer = make_conv(16, 96, 3, 2, 2, "bipolar", stride=1, pad=1)
    _check_conv_legalized(layer, (2, 96, 6, 19), Tiling(tile_w=tile_w, vec_blocks=1))


@pytest.mark.parametrize("wb,ab", [(1, 1), (4, 4)])
def test_negative_heavy_bipolar(wb, ab):
    """Weight code 0 everywhere (value -(2^wb - 1)) and maximal activations: the most negative accumulators."""
    codes = torch.zeros(16, 72, 3, 3, dtype=torch.int64)
    codes[3, 5, 1, 1] = (1 << wb) - 1
    layer = make_conv(16, 72, 3, wb, ab, "bipolar", codes=codes)
    shape = (1, 72, 6, 6)
    isa = Avx512PopcntIsa()
    geom = conv_geometry(layer, shape)
    full = torch.full(shape, (1 << ab) - 1, dtype=torch.int32)
    expected = accumulate(layer, full).numpy()
    got = _run(build_bitserial(geom, isa, isa.tiling(geom)), ZNVER3, full, pack_weights(layer), expected.shape)
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    assert expected.min() == -((1 << wb) - 1) * ((1 << ab) - 1) * 72 * 9


@pytest.mark.parametrize(
    "out_f,in_f,wb,ab,encoding,batch",
    [(10, 100, 1, 1, "bipolar", 1), (16, 64, 2, 3, "unsigned", 3), (13, 300, 4, 4, "bipolar", 2)],
)
def test_dense_matches_reference(out_f, in_f, wb, ab, encoding, batch):
    layer = make_dense(out_f, in_f, wb, ab, encoding)
    isa = Avx512PopcntIsa()
    geom = dense_geometry(layer, (batch, in_f))
    codes = _random_codes((batch, in_f), ab)
    expected = accumulate(layer, codes).numpy()
    got = _run(build_bitserial(geom, isa, isa.tiling(geom)), ZNVER3, codes, pack_weights(layer), expected.shape)
    np.testing.assert_array_equal(got.astype(np.int64), expected)


# --- the real instructions, where the host has them --------------------------------------------------------------


@pytest.mark.skipif(not HOST_VPOPCNTDQ, reason="host CPU has no avx512_vpopcntdq")
@pytest.mark.parametrize("out_c,in_c,k,wb,ab,encoding,stride,pad,size", LEGALIZED_CONV_CASES[:6])
def test_znver4_conv_runs_exact(out_c, in_c, k, wb, ab, encoding, stride, pad, size):
    check_conv(make_conv(out_c, in_c, k, wb, ab, encoding, stride, pad), (1, in_c, size, size), ZNVER4)


@pytest.mark.skipif(not HOST_VPOPCNTDQ, reason="host CPU has no avx512_vpopcntdq")
def test_znver4_dense_runs_exact():
    check_dense(make_dense(13, 300, 4, 4, "bipolar"), (2, 300), ZNVER4)
