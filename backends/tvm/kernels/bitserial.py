"""Bit-serial popcount kernels for frozen integer conv/dense layers: the interface the Relax lowering calls.

Every function takes the layer's :class:`~fxquant.integer.FrozenLayer` description (data, not a module).
``pack_weights`` packs a layer's weight codes once (layout in :mod:`.layout`); ``conv2d_primfunc`` and
``dense_primfunc`` return one scheduled PrimFunc per layer call with parameters

    codes          int32, NCHW (conv) or (N, K) (dense), activation codes in [0, 2^act_bits - 1]
    packed_weight  uint64, exactly the array ``pack_weights`` returned
    out            int32, NCHW (conv) or (N, O) (dense): the exact accumulator ``integer.accumulate(layer, codes)``

Activation codes are bit-packed inside the PrimFunc (no extra call). For ``weight_encoding == "bipolar"`` a
weight code ``c`` means ``2c - (2^wb - 1)``; the kernel counts ``sum a*c`` with unsigned popcounts and returns
``2 * sum(a*c) - (2^wb - 1) * sum(a)``, both terms exact in signed integers. The instruction selection follows
the target: AArch64 -> NEON ``cnt`` kernel, x86 with AVX-512 VPOPCNTDQ -> ``vpopcntq`` kernel (zmm), x86 with
AVX2 -> ``vpshufb`` kernel, anything else -> portable ``llvm.ctpop`` kernel. Use a target that names the CPU
(e.g. ``{"kind": "llvm", "mcpu": "znver3"}``) to get AVX2 on x86; a bare ``{"kind": "llvm"}`` means baseline
x86-64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tvm
from tvm import tirx
from tvm.target.codegen import llvm_cpu_has_features

from fxquant.conv_geometry import DenseGeometry
from fxquant.conv_geometry import conv_geometry as resolve_conv
from fxquant.integer import FrozenConv2d, FrozenLayer, FrozenLinear, input_channels

from .geometry import BitserialGeometry
from .layout import pack_weights_array
from .microkernel import PopcountIsa, Tiling, build_bitserial
from .schedule_arm import NeonIsa
from .schedule_generic import GenericIsa
from .schedule_x86 import Avx2Isa, Avx512PopcntIsa

__all__ = [
    "ENCODINGS",
    "bitserial_supported",
    "pack_weights",
    "conv2d_primfunc",
    "dense_primfunc",
    "conv_geometry",
    "dense_geometry",
    "select_isa",
    "layer_tiling",
]

ENCODINGS = ("bipolar", "unsigned")


def _weight_values(codes: np.ndarray, bits: int, encoding: str) -> np.ndarray:
    codes = codes.astype(np.int64)
    return 2 * codes - ((1 << bits) - 1) if encoding == "bipolar" else codes


def bitserial_supported(layer: FrozenLayer, max_bits: int = 4) -> tuple[bool, str]:
    """(ok, reason if not): what these kernels can compute exactly for ``layer``."""
    if not isinstance(layer, FrozenConv2d | FrozenLinear):
        return False, f"{type(layer).__name__} is neither FrozenConv2d nor FrozenLinear"
    if isinstance(layer, FrozenConv2d) and layer.groups != 1:
        return False, f"groups={layer.groups} (only groups=1 is bit-serial)"
    if layer.weight_encoding not in ENCODINGS:
        return False, f"weight_encoding={layer.weight_encoding!r} is not one of {ENCODINGS}"
    for what, bits in (("weight_bits", layer.weight_bits), ("act_bits", layer.act_bits)):
        if not 1 <= bits <= max_bits:
            return False, f"{what}={bits} outside 1..{max_bits}"
    if layer.input_levels_int is not None:
        return False, "codebook input levels are not bit-planes of codes"
    codes = layer.weight_codes.cpu().numpy()
    if codes.size and int(codes.max()) >= 1 << layer.weight_bits:
        return False, f"weight codes reach {int(codes.max())}, above {(1 << layer.weight_bits) - 1}"
    expected = _weight_values(codes, layer.weight_bits, layer.weight_encoding)
    if not np.array_equal(expected, layer.weight_int.cpu().numpy().astype(np.int64)):
        return False, f"weight_int does not match weight_codes under the {layer.weight_encoding} encoding"
    return True, ""


def pack_weights(layer: FrozenLayer) -> np.ndarray:
    """The ``packed_weight`` argument: uint64 bit-planes of ``layer.weight_codes`` (see :mod:`.layout`)."""
    return pack_weights_array(layer.weight_codes.cpu().numpy(), layer.weight_bits)


def conv_geometry(layer: FrozenConv2d, input_shape: tuple[int, int, int, int]) -> BitserialGeometry:
    """Shapes of one conv call; the input must have the layer's channel count."""
    if int(input_shape[1]) != input_channels(layer):
        raise ValueError(
            f"input has {int(input_shape[1])} channels, layer {layer.name or 'conv'} expects {input_channels(layer)}"
        )
    conv = resolve_conv(tuple(int(d) for d in input_shape), tuple(layer.weight_codes.shape), layer.stride,
                        layer.padding, layer.dilation, layer.groups, layer.name)
    return BitserialGeometry.of(conv, layer.act_bits, layer.weight_bits, layer.weight_encoding == "bipolar")


def dense_geometry(layer: FrozenLinear, input_shape: tuple[int, int]) -> BitserialGeometry:
    """A dense call as a 1x1 convolution of a 1x1 image, features as channels."""
    n, k = (int(d) for d in input_shape)
    if k != input_channels(layer):
        raise ValueError(f"input has {k} features, layer {layer.name or 'linear'} expects {input_channels(layer)}")
    conv = DenseGeometry(n, k, int(layer.weight_codes.shape[0])).as_conv()
    return BitserialGeometry.of(conv, layer.act_bits, layer.weight_bits, layer.weight_encoding == "bipolar",
                                dense=True)


def _as_target(target: tvm.target.Target | Mapping[str, Any] | str) -> tvm.target.Target:
    """Accept the dict form of a target as well (``{"kind": "llvm", ...}``)."""
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def select_isa(target: tvm.target.Target | Mapping[str, Any] | str) -> PopcountIsa:
    """The instruction choice for ``target``: NEON on AArch64; on x86 AVX-512 VPOPCNTDQ, else AVX2, where LLVM's
    CPU has them; else portable."""
    target = _as_target(target)
    triple = str(target.attrs.get("mtriple", "") or "")
    if target.kind.name == "llvm":
        if triple.startswith(("aarch64", "arm64")):
            return NeonIsa()
        if not triple or triple.startswith(("x86_64", "i686", "i386")):
            if bool(llvm_cpu_has_features(["avx512f", "avx512vpopcntdq"], target)):
                return Avx512PopcntIsa()
            if bool(llvm_cpu_has_features(["avx2"], target)):
                return Avx2Isa()
    return GenericIsa()


def _tag_isa(func: tirx.PrimFunc, isa: PopcountIsa) -> tirx.PrimFunc:
    """Record which instruction choice was built (reports and tests read ``fxquant.bitserial_isa``)."""
    return func.with_attr("fxquant.bitserial_isa", isa.name)


def _geometry(layer: FrozenLayer, input_shape: tuple[int, ...]) -> BitserialGeometry:
    if isinstance(layer, FrozenConv2d):
        return conv_geometry(layer, input_shape)  # type: ignore[arg-type]
    return dense_geometry(layer, input_shape)  # type: ignore[arg-type]


def layer_tiling(layer: FrozenLayer, input_shape: tuple[int, ...], target: tvm.target.Target) -> Tiling:
    """The register tile of ``layer`` on ``input_shape`` for ``target``: the one place a tiling is chosen (each
    ISA's ``tiling`` rule, see ``schedule_*.py``); the builders take it as an argument."""
    return select_isa(target).tiling(_geometry(layer, input_shape))


def conv2d_primfunc(
    layer: FrozenConv2d, input_shape: tuple[int, int, int, int], target: tvm.target.Target,
    tiling: Tiling | None = None,
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(codes, packed_weight, out)`` for one conv call on ``input_shape`` (NCHW).

    The kernel itself is exact up to 8-bit codes; the caller's ``bitserial_supported(max_bits=...)`` decides
    where bit-serial stops paying off. The function's ``global_symbol`` is ``"bitserial_conv2d"``.
    """
    ok, why = bitserial_supported(layer, max_bits=8)
    if not ok:
        raise ValueError(f"layer {layer.name or 'conv'} is not bit-serial: {why}")
    geom = conv_geometry(layer, input_shape)
    isa = select_isa(target)
    return _tag_isa(build_bitserial(geom, isa, tiling or isa.tiling(geom)), isa)


def dense_primfunc(
    layer: FrozenLinear, input_shape: tuple[int, int], target: tvm.target.Target, tiling: Tiling | None = None
) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(codes, packed_weight, out)`` for one dense call on ``(N, K)`` codes.

    Built as a 1x1 convolution of a 1x1 image; ``global_symbol`` is ``"bitserial_dense"``.
    """
    ok, why = bitserial_supported(layer, max_bits=8)
    if not ok:
        raise ValueError(f"layer {layer.name or 'linear'} is not bit-serial: {why}")
    geom = dense_geometry(layer, input_shape)
    isa = select_isa(target)
    return _tag_isa(build_bitserial(geom, isa, tiling or isa.tiling(geom)), isa)
