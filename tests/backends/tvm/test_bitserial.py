"""Bit-serial kernels: exact int32 accumulators against ``fxquant.integer.accumulate`` and the intended instructions."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm.target.codegen import llvm_cpu_has_features, llvm_get_system_cpu

from fxquant.backends.tvm.emulate import emulation_available, emulation_missing, qemu_python_command
from fxquant.backends.tvm.kernels import bitserial_supported, conv2d_primfunc, dense_primfunc, pack_weights
from fxquant.backends.tvm.kernels.bitserial import select_isa
from fxquant.backends.tvm.kernels.layout import WORD_BITS, padded_words
from fxquant.integer import FrozenConv2d, FrozenLinear, accumulate, frozen_layer

HOST = tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})
BASELINE = tvm.target.Target({"kind": "llvm"})  # x86-64 without AVX2: the portable kernel
ARM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
HOST_AVX2 = bool(llvm_cpu_has_features(["avx2"], HOST))
#: an AVX2 core without AVX-512: the AVX2 kernel is built and run on any AVX2 host, whatever else it has
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def _weight_int(codes: torch.Tensor, bits: int, encoding: str) -> torch.Tensor:
    return 2 * codes - ((1 << bits) - 1) if encoding == "bipolar" else codes


def make_conv(
    out_c: int, in_c: int, k: int, wb: int, ab: int, encoding: str, stride: int = 1, pad: int = 1,
    dilation: int = 1, codes: torch.Tensor | None = None, seed: int = 0,
) -> FrozenConv2d:
    gen = torch.Generator().manual_seed(seed)
    if codes is None:
        codes = torch.randint(0, 1 << wb, (out_c, in_c, k, k), generator=gen)
    return frozen_layer(
        FrozenConv2d,
        weight_int=_weight_int(codes, wb, encoding), weight_codes=codes, weight_scale=torch.ones(out_c), bias=None,
        weight_bits=wb, weight_encoding=encoding, act_bits=ab, input_low=torch.tensor(0.0),
        input_step=torch.tensor(1.0), stride=(stride, stride), padding=(pad, pad), dilation=(dilation, dilation),
        groups=1,
    )


def make_dense(out_f: int, in_f: int, wb: int, ab: int, encoding: str, seed: int = 0) -> FrozenLinear:
    codes = torch.randint(0, 1 << wb, (out_f, in_f), generator=torch.Generator().manual_seed(seed))
    return frozen_layer(
        FrozenLinear,
        weight_int=_weight_int(codes, wb, encoding), weight_codes=codes, weight_scale=torch.ones(out_f), bias=None,
        weight_bits=wb, weight_encoding=encoding, act_bits=ab, input_low=torch.tensor(0.0),
        input_step=torch.tensor(1.0),
    )


def _random_codes(shape: tuple[int, ...], bits: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _run(func: tvm.tirx.PrimFunc, target: tvm.target.Target, codes: torch.Tensor, packed: np.ndarray,
         out_shape: tuple[int, ...]) -> np.ndarray:
    name = str(func.attrs["global_symbol"])
    kernel = tvm.compile(func, target=target).mod[name]
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full(out_shape, 7777, np.int32), dev)  # not zero: every element must be written
    kernel(tvm.runtime.tensor(codes.numpy(), dev), tvm.runtime.tensor(packed, dev), out)
    return out.numpy()


def check_conv(layer: FrozenConv2d, shape: tuple[int, int, int, int], target: tvm.target.Target,
               codes: torch.Tensor | None = None) -> np.ndarray:
    codes = _random_codes(shape, layer.act_bits) if codes is None else codes
    expected = accumulate(layer, codes).numpy()
    got = _run(conv2d_primfunc(layer, shape, target), target, codes, pack_weights(layer), expected.shape)
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    return expected


def check_dense(layer: FrozenLinear, shape: tuple[int, int], target: tvm.target.Target) -> np.ndarray:
    codes = _random_codes(shape, layer.act_bits)
    expected = accumulate(layer, codes).numpy()
    got = _run(dense_primfunc(layer, shape, target), target, codes, pack_weights(layer), expected.shape)
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    return expected


# (out_c, in_c, k, wb, ab, encoding, stride, pad, dilation, image size)
CONV_CASES = [
    pytest.param(16, 64, 3, 1, 1, "bipolar", 1, 1, 1, 9, id="W1A1-bipolar-3x3-s1p1-64ch"),
    pytest.param(13, 70, 3, 1, 2, "bipolar", 2, 1, 1, 9, id="W1A2-bipolar-3x3-s2p1-70ch-13out"),
    pytest.param(16, 33, 3, 2, 2, "unsigned", 1, 0, 1, 8, id="W2A2-unsigned-3x3-s1p0-33ch"),
    pytest.param(8, 100, 1, 3, 3, "bipolar", 1, 0, 1, 7, id="W3A3-bipolar-1x1-100ch"),
    pytest.param(9, 24, 3, 4, 4, "unsigned", 2, 1, 1, 11, id="W4A4-unsigned-3x3-s2p1-24ch"),
    pytest.param(8, 130, 1, 2, 2, "bipolar", 2, 0, 1, 9, id="W2A2-bipolar-1x1-s2-130ch"),
    pytest.param(8, 40, 3, 2, 1, "bipolar", 1, 2, 2, 8, id="W2A1-bipolar-3x3-dilation2"),
    pytest.param(8, 320, 3, 1, 1, "bipolar", 1, 1, 1, 5, id="W1A1-bipolar-320ch-chunk-per-row"),
    pytest.param(8, 2100, 1, 1, 2, "unsigned", 1, 0, 1, 3, id="W1A2-unsigned-2100ch-chunked-words"),
    pytest.param(16, 200, 3, 1, 2, "bipolar", 1, 1, 1, 11, id="W1A2-bipolar-200ch-row-tile-with-tail"),
]


@pytest.mark.skipif(not HOST_AVX2, reason="host CPU has no AVX2")
@pytest.mark.parametrize("out_c,in_c,k,wb,ab,encoding,stride,pad,dilation,size", CONV_CASES)
def test_conv_avx2_matches_reference(out_c, in_c, k, wb, ab, encoding, stride, pad, dilation, size):
    layer = make_conv(out_c, in_c, k, wb, ab, encoding, stride, pad, dilation)
    assert select_isa(AVX2).name == "x86-avx2"
    check_conv(layer, (1, in_c, size, size), AVX2)


@pytest.mark.parametrize("out_c,in_c,k,wb,ab,encoding,stride,pad,dilation,size", [CONV_CASES[1], CONV_CASES[4]])
def test_conv_portable_kernel_matches_reference(out_c, in_c, k, wb, ab, encoding, stride, pad, dilation, size):
    layer = make_conv(out_c, in_c, k, wb, ab, encoding, stride, pad, dilation)
    assert select_isa(BASELINE).name == "generic-llvm"
    check_conv(layer, (2, in_c, size, size), BASELINE)


@pytest.mark.parametrize("wb,ab", [(1, 1), (4, 4)])
def test_negative_heavy_bipolar(wb, ab):
    """Weight code 0 everywhere (value -(2^wb - 1)) and maximal activations: large negative accumulators."""
    codes = torch.zeros(16, 72, 3, 3, dtype=torch.int64)
    codes[3, 5, 1, 1] = (1 << wb) - 1  # one positive weight, so not every channel is identical
    layer = make_conv(16, 72, 3, wb, ab, "bipolar", codes=codes)
    shape = (1, 72, 6, 6)
    full = torch.full(shape, (1 << ab) - 1, dtype=torch.int32)
    expected = check_conv(layer, shape, HOST, codes=full)
    assert expected.max() < 0 and expected.min() == -((1 << wb) - 1) * ((1 << ab) - 1) * 72 * 9
    check_conv(layer, shape, HOST)  # random activations, mostly negative sums


def test_batch_and_rectangular_image():
    layer = make_conv(8, 17, 3, 2, 1, "bipolar", stride=1, pad=1)
    check_conv(layer, (3, 17, 5, 10), HOST)


def test_same_padding_string():
    layer = dataclasses.replace(make_conv(8, 20, 3, 1, 1, "unsigned", pad=0), padding="same")
    assert check_conv(layer, (1, 20, 6, 7), HOST).shape == (1, 8, 6, 7)


@pytest.mark.parametrize(
    "out_f,in_f,wb,ab,encoding,batch",
    [(10, 100, 1, 1, "bipolar", 1), (16, 64, 2, 3, "unsigned", 3), (12, 300, 4, 4, "bipolar", 2)],
)
@pytest.mark.parametrize("target", [HOST, BASELINE], ids=["host", "baseline"])
def test_dense_matches_reference(out_f, in_f, wb, ab, encoding, batch, target):
    check_dense(make_dense(out_f, in_f, wb, ab, encoding), (batch, in_f), target)


def test_pack_weights_layout():
    """Bit k of word w for (block, kh, kw, plane) is bit ``plane`` of channel 64*w + k's code; the rest are 0."""
    layer = make_conv(11, 70, 3, 3, 1, "unsigned")
    packed = pack_weights(layer)
    assert packed.dtype == np.uint64 and packed.shape == (2, 3, 3, 3, padded_words(70), 8)
    codes = layer.weight_codes.numpy().astype(np.uint64)
    bits = (packed[..., None] >> np.arange(WORD_BITS, dtype=np.uint64)) & np.uint64(1)  # (B,KH,KW,WB,W,8,64)
    bits = bits.transpose(0, 5, 4, 6, 1, 2, 3).reshape(16, padded_words(70) * WORD_BITS, 3, 3, 3)
    planes = (codes[..., None] >> np.arange(3, dtype=np.uint64)) & np.uint64(1)  # (O, C, KH, KW, WB)
    np.testing.assert_array_equal(bits[:11, :70], planes)
    assert not bits[11:].any() and not bits[:, 70:].any()
    dense = pack_weights(make_dense(5, 130, 2, 2, "bipolar"))
    assert dense.shape == (1, 2, 3, 8)


def test_primfunc_signature_matches_the_interface():
    layer = make_conv(13, 70, 3, 1, 2, "bipolar")
    params = conv2d_primfunc(layer, (2, 70, 9, 9), HOST).params
    got = [(str(b.name), str(b.dtype), tuple(int(d) for d in b.shape)) for b in params]
    assert got == [
        ("codes", "int32", (2, 70, 9, 9)),
        ("packed_weight", "uint64", pack_weights(layer).shape),
        ("out", "int32", (2, 13, 9, 9)),
    ]
    dense = make_dense(10, 100, 2, 2, "unsigned")
    shapes = [tuple(int(d) for d in b.shape) for b in dense_primfunc(dense, (3, 100), HOST).params]
    assert shapes == [(3, 100), pack_weights(dense).shape, (3, 10)]


def test_supported_reasons():
    assert bitserial_supported(make_conv(8, 8, 3, 2, 2, "bipolar")) == (True, "")
    grouped = dataclasses.replace(make_conv(8, 4, 3, 1, 1, "bipolar"), groups=2)
    assert not bitserial_supported(grouped)[0]
    assert "act_bits" in bitserial_supported(make_conv(8, 8, 3, 2, 5, "bipolar"))[1]
    assert bitserial_supported(make_conv(8, 8, 3, 2, 5, "bipolar"), max_bits=8)[0]
    odd = dataclasses.replace(make_conv(8, 8, 3, 2, 2, "bipolar"), weight_encoding="codebook")
    assert "weight_encoding" in bitserial_supported(odd)[1]
    skewed = make_conv(8, 8, 3, 2, 2, "bipolar")
    skewed.weight_int.add_(1)
    assert "weight_int" in bitserial_supported(skewed)[1]
    with pytest.raises(ValueError, match="channels"):
        conv2d_primfunc(make_conv(8, 8, 3, 1, 1, "bipolar"), (1, 9, 5, 5), HOST)


@pytest.mark.skipif(not HOST_AVX2, reason="host CPU has no AVX2")
def test_x86_kernel_uses_byte_shuffle_popcount():
    layer = make_conv(16, 64, 3, 1, 1, "bipolar")
    asm = tvm.compile(conv2d_primfunc(layer, (1, 64, 8, 8), AVX2), target=AVX2).mod.inspect_source("asm")
    assert re.search(r"vpshufb\s+%ymm", asm) and re.search(r"vpsadbw\s+%ymm", asm)


def _arm_module() -> tvm.runtime.Executable:
    layer = make_conv(16, 64, 3, 2, 2, "bipolar")
    func = conv2d_primfunc(layer, (1, 64, 8, 8), ARM)
    assert func.attrs["fxquant.bitserial_isa"] == "aarch64-neon"
    return tvm.compile(func, target=ARM)


def test_neon_kernel_assembly_has_cnt():
    asm = _arm_module().mod.inspect_source("asm")
    assert re.search(r"\bcnt\s+v\d+\.16b", asm) and re.search(r"\buaddlp\s+v\d+\.8h", asm)


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("aarch64-linux-gnu-objdump") is None,
    reason="aarch64 cross tools absent (apt-get install g++-aarch64-linux-gnu binutils-aarch64-linux-gnu)",
)
def test_neon_kernel_object_has_cnt(tmp_path: Path):
    from tvm.support import cc

    lib = tmp_path / "conv.so"
    _arm_module().export_library(str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True, check=True)
    assert re.search(r"\bcnt\s+v\d+\.16b", dump.stdout)
    assert re.search(r"\band\s+v\d+\.16b", dump.stdout)  # pixel pairs AND weight pairs (no ld1r broadcast)


@pytest.mark.skipif(not emulation_available(), reason=f"aarch64 emulation absent: {'; '.join(emulation_missing())}")
def test_neon_kernel_exact_under_qemu(tmp_path: Path):
    from tvm.support import cc

    layer = make_conv(13, 70, 3, 3, 2, "bipolar", stride=2)
    shape = (1, 70, 9, 9)
    func = conv2d_primfunc(layer, shape, ARM)
    tvm.compile(func, target=ARM).export_library(
        str(tmp_path / "conv.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++")
    )
    codes = _random_codes(shape, 2)
    np.savez(tmp_path / "io.npz", codes=codes.numpy(), w=pack_weights(layer),
             ref=accumulate(layer, codes).numpy().astype(np.int32))
    runner = tmp_path / "run.py"
    runner.write_text(
        "import numpy as np, tvm\n"
        f"d = np.load({str(tmp_path / 'io.npz')!r})\n"
        f"m = tvm.runtime.load_module({str(tmp_path / 'conv.so')!r})\n"
        "out = tvm.runtime.tensor(np.zeros(d['ref'].shape, np.int32))\n"
        "m['bitserial_conv2d'](tvm.runtime.tensor(d['codes']), tvm.runtime.tensor(d['w']), out)\n"
        "print('EXACT' if np.array_equal(out.numpy(), d['ref']) else 'MISMATCH')\n"
    )
    cmd = qemu_python_command(runner)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert "EXACT" in result.stdout, result.stdout + result.stderr


def test_isa_selection():
    assert select_isa(ARM).name == "aarch64-neon"
    assert select_isa(BASELINE).name == "generic-llvm"
    assert select_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx2"]}).name == "x86-avx2"
