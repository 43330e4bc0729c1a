"""Static shapes of a convolution or dense layer: the one place that resolves padding and output sizes."""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import BackendError

__all__ = ["ConvGeometry", "DenseGeometry", "conv_geometry"]


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


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
        return (self.height + top + bottom - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1

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
        per_output = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
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
        return self.batch * self.in_features * self.out_features


def conv_geometry(
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    stride: int | tuple[int, ...],
    padding: int | str | tuple[int, ...],
    dilation: int | tuple[int, ...],
    groups: int,
    name: str = "",
) -> ConvGeometry:
    """Resolve torch's padding forms ("valid", "same", ints) against a static NCHW input shape."""
    if len(input_shape) != 4:
        raise BackendError(f"layer {name}: conv2d needs a 4-d NCHW input, got shape {tuple(input_shape)}")
    batch, channels, height, width = (int(v) for v in input_shape)
    out_channels, _, kh, kw = (int(v) for v in weight_shape)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            total_h, total_w = dh * (kh - 1), dw * (kw - 1)
            pads = (total_h // 2, total_w // 2, total_h - total_h // 2, total_w - total_w // 2)
        else:
            raise BackendError(f"layer {name}: padding={padding!r} is not 'valid', 'same' or integers")
    else:
        ph, pw = _pair(padding)
        pads = (ph, pw, ph, pw)
    return ConvGeometry(batch, channels, height, width, out_channels, (kh, kw), (sh, sw), pads, (dh, dw), int(groups))
