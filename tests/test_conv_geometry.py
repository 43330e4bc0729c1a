"""The one conv geometry: padding resolution, output sizes and MACs agree with PyTorch's convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxquant.conv_geometry import DenseGeometry, conv_geometry, resolve_padding
from fxquant.errors import BackendError

# (input NCHW, weight OIHW, stride, padding, dilation, groups)
CASES = [
    ((1, 3, 17, 15), (8, 3, 7, 7), 2, 3, 1, 1),
    ((2, 8, 9, 10), (8, 1, 3, 3), (2, 1), (1, 0), 1, 8),
    ((1, 6, 11, 12), (4, 3, 4, 2), 1, "same", (2, 3), 2),
    ((1, 4, 8, 8), (4, 4, 3, 3), 1, "valid", 1, 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the asymmetric case, on purpose
@pytest.mark.parametrize(("ishape", "wshape", "stride", "padding", "dilation", "groups"), CASES)
def test_output_shape_and_macs_match_torch(ishape, wshape, stride, padding, dilation, groups) -> None:
    geom = conv_geometry(ishape, wshape, stride, padding, dilation, groups)
    out = F.conv2d(torch.zeros(ishape), torch.zeros(wshape), None, stride, padding, dilation, groups)
    assert geom.output_shape == tuple(out.shape)
    assert geom.weight_shape == wshape
    assert geom.macs == out.numel() * (ishape[1] // groups) * wshape[2] * wshape[3]


def test_same_padding_puts_the_odd_pixel_last() -> None:
    assert resolve_padding("same", (4, 3), (1, 2)) == (1, 2, 2, 2)
    assert resolve_padding((2, 1), (3, 3), (1, 1)) == (2, 1, 2, 1)
    with pytest.raises(BackendError, match="layer conv7: padding='full' is not one of"):
        resolve_padding("full", (3, 3), (1, 1), "conv7")


def test_dense_is_a_one_by_one_convolution() -> None:
    dense = DenseGeometry(3, 37, 19)
    conv = dense.as_conv()
    assert conv.output_shape == (3, 19, 1, 1) and conv.macs == dense.macs == 3 * 37 * 19
