"""The separable max-pool kernel: equal to PyTorch on odd sizes, stride, padding, dilation and ceil_mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.kernels.pool import PoolGeometry, max_pool2d

HOST = make_target(host_target_dict(), None)

CASES = [  # (shape, kernel, stride, padding, dilation, ceil_mode)
    ((1, 4, 16, 16), 3, 2, 1, 1, False),  # a ResNet stem pool: output width a multiple of 8
    ((2, 5, 13, 11), 3, 2, 1, 1, True),
    ((1, 3, 9, 10), 2, 2, 0, 1, False),
    ((1, 4, 17, 15), 3, 1, 1, 2, True),
    ((1, 2, 7, 7), (3, 2), (2, 1), (1, 0), 1, False),
]


@pytest.mark.parametrize(
    ("case", "dtype"), [(case, "float32") for case in CASES] + [(CASES[1], "int32")],
    ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v[0])),
)
def test_max_pool_equals_pytorch(case, dtype: str) -> None:
    shape, kernel, stride, padding, dilation, ceil_mode = case
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    geom = PoolGeometry(shape, pair(kernel), pair(stride), pair(padding), pair(dilation), ceil_mode)
    x = torch.randn(shape) * 100
    x = x.round().to(torch.int32) if dtype == "int32" else x
    want = torch.nn.functional.max_pool2d(x.double(), kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    assert geom.output_shape == tuple(want.shape)
    lib = tvm.compile(tvm.IRModule({"main": max_pool2d(geom, dtype)}), target=HOST)
    out = tvm.runtime.tensor(np.zeros(geom.output_shape, dtype))
    lib["main"](tvm.runtime.tensor(x.numpy()), out)
    np.testing.assert_array_equal(out.numpy().astype(np.float64), want.numpy())
