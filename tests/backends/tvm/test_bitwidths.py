"""Bitwidth grid and quantizer families on a small residual net: every combination exact against the reference."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.backends.tvm.selection import bitserial_module
from tests.backends.tvm.helpers import ResidualNet, assert_matches_reference, quantized


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_and_activation_bits_grid(bits: int) -> None:
    """All layers (first and last too) at W{bits}A{bits}; the first layer has a signed input grid (offset term)."""
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=bits, act_bits=bits, first_last_bits=None)
    ref = fxquant.convert(q, backend="torch")
    forced = {"dw": "direct", "*": "bitserial"} if bitserial_module() is not None else "auto"
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, kernel=forced)
    assert_matches_reference(mod, ref, x)
    kernels = {e["name"]: e["kernel"] for e in mod.manifest["layers"]}
    if bitserial_module() is not None:
        assert kernels["stem.0"] == "bitserial" and kernels["head"] == "bitserial"
        assert kernels["dw"] == "direct"  # grouped: the direct kernel
    dot = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, kernel={"dw": "direct", "*": "dot"})
    assert_matches_reference(dot, ref, x)
    assert {e["kernel"] for e in dot.manifest["layers"] if e["name"] != "dw"} == {"dot"}


@pytest.mark.parametrize("quantizer", ["lsq", "qn", "lcq"])
def test_quantizer_families(quantizer: str) -> None:
    """Signed weights (LSQ), threshold activations (QN) and codebook activations with a lookup (LCQ)."""
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, quantizer=quantizer, weight_bits=2, act_bits=2)
    ref = fxquant.convert(q, backend="torch")
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True)
    assert_matches_reference(mod, ref, x)


def test_without_bitserial() -> None:
    """``bitserial=False`` leaves the dot-product and direct kernels, and says so for every layer."""
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2)
    ref = fxquant.convert(q, backend="torch")
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, bitserial=False)
    assert_matches_reference(mod, ref, x)
    assert all(e["kernel"] in ("dot", "direct") for e in mod.manifest["layers"])
    assert all("no bitserial: bit-serial kernel disabled (bitserial=False)" in e["reason"]
               for e in mod.manifest["layers"])
