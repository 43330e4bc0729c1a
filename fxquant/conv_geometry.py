"""Convolution and dense geometry in plain integers: the one place that resolves padding, output sizes and MACs.

A leaf module (no torch, no TVM, nothing of fxquant but its errors), so that the cost model of the search,
the TVM lowering and every kernel family derive their shapes from the same rules, PyTorch's:

    out = (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1

Padding is always held resolved, as ``(top, left, bottom, right)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import BackendError

__all__ = [
    "PADDING_MODES",
    "ConvGeometry",
    "DenseGeometry",
    "conv_geometry",
    "pair",
    "resolve_padding",
    "output_size",
    "macs_per_output",
]

#: PyTorch's string padding forms
PADDING_MODES = ("valid", "same")


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """PyTorch's ``int | (int,) | (int, int)`` argument forms as ``(h, w)``."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def resolve_padding(
    padding: int | str | tuple[int, ...], kernel: tuple[int, int], dilation: tuple[int, int], name: str = ""
) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` from PyTorch's conv padding argument ("valid", "same" or integers).

    "same" puts the odd pixel of an even total at the bottom/right, as PyTorch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            total_h, total_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return total_h // 2, total_w // 2, total_h - total_h // 2, total_w - total_w // 2
        raise BackendError(f"layer {name}: padding={padding!r} is not one of {PADDING_MODES} or integers")
    ph, pw = pair(padding)
    return ph, pw, ph, pw


def output_size(
    size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int, ceil_mode: bool = False
) -> int:
    """Output extent along one axis; ``ceil_mode`` as PyTorch's pools define it (a last window must start
    inside the input or its leading padding)."""
    span = size + pad_before + pad_after - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad_before else out


def macs_per_output(in_channels: int, groups: int, kernel: tuple[int, int]) -> int:
    """Multiply-accumulates per output element of a (grouped) convolution; a dense layer is a 1x1 one."""
    return (in_channels // groups) * kernel[0] * kernel[1]


@dataclass(frozen=True)
class ConvGeometry:
    """NCHW input, OIHW weight (``in_channels // groups`` per group); padding is (top, left, bottom, right)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return output_size(self.height, self.kernel[0], self.stride[0], top, bottom, self.dilation[0])

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return output_size(self.width, self.kernel[1], self.stride[1], left, right, self.dilation[1])

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def macs(self) -> int:
        per_output = macs_per_output(self.in_channels, self.groups, self.kernel)
        return self.batch * self.out_channels * self.out_height * self.out_width * per_output


@dataclass(frozen=True)
class DenseGeometry:
    """(N, K) input times (O, K) weight."""

    batch: int
    in_features: int
    out_features: int

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.batch, self.in_features)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.batch, self.out_features)

    @property
    def macs(self) -> int:
        return self.batch * self.out_features * macs_per_output(self.in_features, 1, (1, 1))

    def as_conv(self) -> ConvGeometry:
        """The same layer as the 1x1 convolution of a 1x1 image (features as channels)."""
        return ConvGeometry(self.batch, self.in_features, 1, 1, self.out_features, (1, 1), (1, 1), (0, 0, 0, 0),
                            (1, 1), 1)


def conv_geometry(
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    stride: int | tuple[int, ...],
    padding: int | str | tuple[int, ...],
    dilation: int | tuple[int, ...],
    groups: int,
    name: str = "",
) -> ConvGeometry:
    """Resolve torch's conv arguments against a static NCHW input shape."""
    if len(input_shape) != 4:
        raise BackendError(f"layer {name}: conv2d needs a 4-d NCHW input, got shape {tuple(input_shape)}")
    batch, channels, height, width = (int(v) for v in input_shape)
    out_channels, _, kh, kw = (int(v) for v in weight_shape)
    dilation_hw = pair(dilation)
    pads = resolve_padding(padding, (kh, kw), dilation_hw, name)
    return ConvGeometry(batch, channels, height, width, out_channels, (kh, kw), pair(stride), pads, dilation_hw,
                        int(groups))
