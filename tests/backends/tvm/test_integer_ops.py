"""Quantization and rescale computes against the reference functions, bit for bit (ties, clamps, no FMA)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tvm
from tvm import te
from tvm.s_tir import dlight

from fxquant.backends.tvm import integer_ops
from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.integer_layers import padded_thresholds
from fxquant.backends.tvm.schedule_rules import CpuGeneric
from fxquant.quantizers.grid import threshold_codes, uniform_codes

TARGET = make_target(host_target_dict(), None)


def _compile(inputs: list[te.Tensor], output: te.Tensor):
    """Scheduled like the fused functions of a model (vectorized, parallel) and built for this host."""
    mod = tvm.IRModule({"main": te.create_prim_func([*inputs, output])})
    with TARGET:
        mod = dlight.ApplyDefaultSchedule(CpuGeneric())(mod)
    return tvm.compile(mod, target=TARGET)


def _call(lib, arrays: list[np.ndarray], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros(shape, dtype))
    lib(*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def test_uniform_codes_match_reference_on_ties_and_clamps() -> None:
    low, step, bits = np.float32(-0.37), np.float32(0.1234), 3
    k = np.arange(-4, 12, dtype=np.float32)
    ties = low + (k + np.float32(0.5)) * step  # exactly between two levels, after float32 rounding of the input
    rng = np.random.default_rng(0)
    x = np.concatenate([ties, np.nextafter(ties, 0), rng.normal(0, 1, 4096 - 2 * k.size)]).astype(np.float32)
    xt = te.placeholder((x.size,), "float32", name="x")
    lib = _compile([xt], integer_ops.uniform_codes(xt, float(low), float(step), bits))
    got = _call(lib, [x], (x.size,), "int32")
    want = uniform_codes(torch.from_numpy(x), torch.tensor(low), torch.tensor(step), bits)
    np.testing.assert_array_equal(got, want.numpy().astype(np.int32))
    assert got.min() == 0 and got.max() == 2**bits - 1


@pytest.mark.parametrize("count", [1, 3, 4, 255])
def test_threshold_codes_and_lookup(count: int) -> None:
    """Counting reached thresholds equals ``bucketize(right=True)``, duplicates and exact hits included."""
    base = torch.sort(torch.randn(count)).values
    if count >= 3:
        base[1] = base[2]  # a repeated threshold
    x = torch.cat([base, torch.randn(1024 - count)]).float()
    padded = padded_thresholds(SimpleNamespace(input_thresholds=base.flip(0)))
    np.testing.assert_array_equal(padded, base.numpy())
    xt = te.placeholder((x.numel(),), "float32", name="x")
    tt = te.placeholder(padded.shape, "float32", name="t")
    table = np.arange(count + 1, dtype=np.int32) * 3 - 7
    lt = te.placeholder(table.shape, "int32", name="table")
    lib = _compile([xt, tt, lt], integer_ops.lookup_values(integer_ops.threshold_codes(xt, tt), lt))
    got = _call(lib, [x.numpy(), padded, table], (x.numel(),), "int32")
    want = torch.from_numpy(table)[threshold_codes(x, base).long()]
    np.testing.assert_array_equal(got, want.numpy())


def test_rescale_rounds_like_two_pytorch_kernels() -> None:
    """``acc * scale + const`` must not become one fused multiply-add (that rounds once, PyTorch rounds twice)."""
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**20), 2**20, (4, 16, 8, 8)).astype(np.int32)
    scale = rng.uniform(1e-4, 1e-2, (1, 16, 1, 1)).astype(np.float32)
    const = rng.normal(0, 1, (1, 16, 8, 8)).astype(np.float32)
    tensors = [te.placeholder(a.shape, str(a.dtype), name=n) for a, n in ((acc, "acc"), (scale, "s"), (const, "c"))]
    lib = _compile(tensors, integer_ops.rescale(*tensors))
    got = _call(lib, [acc, scale, const], acc.shape, "float32")
    want = torch.from_numpy(acc).to(torch.float32) * torch.from_numpy(scale) + torch.from_numpy(const)
    np.testing.assert_array_equal(got, want.numpy())
    fused = (acc.astype(np.float64) * scale.astype(np.float64) + const.astype(np.float64)).astype(np.float32)
    assert (fused != want.numpy()).any()  # the data does tell one rounding from two
