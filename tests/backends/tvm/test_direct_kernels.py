"""The direct conv2d/dense kernels alone: exact int32 results for any geometry, float32 close to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.direct import direct_conv2d, direct_dense
from fxquant.conv_geometry import DenseGeometry, conv_geometry

TARGET = make_target(host_target_dict(), None)

# (input NCHW, weight OIHW, stride, padding, dilation, groups)
CONVS = [
    ((2, 16, 13, 13), (24, 16, 3, 3), 1, 1, 1, 1),  # output channels not a multiple of the vector
    ((2, 16, 14, 14), (32, 16, 3, 3), 2, 1, 1, 1),  # strided
    ((2, 3, 20, 20), (10, 3, 7, 7), 2, 3, 1, 1),  # stem-like, 10 outputs
    ((2, 8, 16, 16), (8, 1, 3, 3), 1, 1, 1, 8),  # depthwise, vectorized rows
    ((2, 8, 9, 9), (8, 1, 3, 3), 2, 1, 1, 8),  # depthwise, strided, odd width
    ((1, 16, 10, 10), (16, 4, 3, 3), 1, 2, 2, 4),  # grouped and dilated
    ((2, 32, 7, 7), (64, 16, 1, 1), 1, 0, 1, 2),  # grouped, 8-aligned groups: output-channel vectors
    ((2, 8, 11, 11), (16, 8, 3, 3), 1, "same", 1, 1),  # string padding
]


def _run(func: tvm.tirx.PrimFunc, *arrays: np.ndarray, out_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    lib = tvm.compile(func, target=TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype))
    lib(*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize(("ishape", "wshape", "stride", "padding", "dilation", "groups"), CONVS)
def test_conv2d_exact_for_integers(ishape, wshape, stride, padding, dilation, groups) -> None:
    rng = np.random.default_rng(0)
    geom = conv_geometry(ishape, wshape, stride, padding, dilation, groups)
    codes = rng.integers(0, 256, ishape).astype(np.int32)
    for weight_dtype, high in (("int8", 128), ("int32", 256)):
        weight = rng.integers(-high + 1, high, wshape).astype(weight_dtype)
        kernel = direct_conv2d(geom, "int32", weight_dtype, "int32")
        got = _run(kernel.func, codes, kernel.pack(weight), out_shape=geom.output_shape, dtype="int32")
        want = F.conv2d(torch.from_numpy(codes).double(), torch.from_numpy(weight).double(), None,
                        stride, padding, dilation, groups)
        assert got.shape == tuple(want.shape)
        np.testing.assert_array_equal(got, want.numpy().astype(np.int64))


@pytest.mark.parametrize(("ishape", "wshape", "stride", "padding", "dilation", "groups"), CONVS[:4])
def test_conv2d_float(ishape, wshape, stride, padding, dilation, groups) -> None:
    rng = np.random.default_rng(1)
    geom = conv_geometry(ishape, wshape, stride, padding, dilation, groups)
    x = rng.standard_normal(ishape).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    kernel = direct_conv2d(geom, "float32", "float32", "float32")
    got = _run(kernel.func, x, kernel.pack(w), out_shape=geom.output_shape, dtype="float32")
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), None, stride, padding, dilation, groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("batch", "features", "outputs"), [(2, 512, 10), (3, 100, 17), (8, 64, 64)])
def test_dense_exact_for_integers(batch: int, features: int, outputs: int) -> None:
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (batch, features)).astype(np.int32)
    weight = rng.integers(-255, 256, (outputs, features)).astype(np.int32)
    kernel = direct_dense(DenseGeometry(batch, features, outputs), "int32", "int32", "int32")
    got = _run(kernel.func, codes, kernel.pack(weight), out_shape=(batch, outputs), dtype="int32")
    np.testing.assert_array_equal(got, codes.astype(np.int64) @ weight.astype(np.int64).T)
