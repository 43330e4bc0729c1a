"""Frozen integer layers: the numerics reference every backend must reproduce.

A frozen layer quantizes its float input to unsigned codes ``c_a`` (the input real value is
``input_low + input_step * c_a``), accumulates ``acc = Σ c_a · w_int`` exactly in int64, and rescales:

    y = acc · out_scale[o]  +  (offset_acc · offset_scale[o] + bias[o])

where ``out_scale = input_step · weight_scale``, ``offset_scale = input_low · weight_scale`` and
``offset_acc = Σ 1 · w_int`` over the same (zero-padded) window, which only matters when the input grid
does not start at zero. All rescaling is float32 in this order, so a backend can match it to float32
rounding while its integer accumulators match exactly.

Codebook (non-uniform) inputs: when ``input_levels_int`` is set, code ``c_a`` stands for the integer
``input_levels_int[c_a]`` (real value ``input_step * input_levels_int[c_a]``, ``input_low = 0``), and the
accumulator is ``Σ input_levels_int[c_a] · w_int``: a per-code lookup before the same exact accumulation.

The contract between stages is data: the freeze pass describes each layer as a :class:`FrozenLayer`
(:class:`FrozenConv2d` or :class:`FrozenLinear`: integer weights, bits, encodings, the input grid, scales and
geometry; no module, no arithmetic), every backend and kernel reads that description, and the functions below
(:func:`accumulate`, :func:`rescale`, :func:`integer_output`, ...) state the arithmetic over it once. The torch
reference keeps an :class:`IntegerLayer` module per layer (built from its description, which it hands back as
``.frozen``) so that the integer graph stays runnable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import InputError
from fxquant.quantizers.grid import level_codes, threshold_codes, uniform_codes

if TYPE_CHECKING:
    from fxquant.quantizers.base import Quantizer

__all__ = [
    "FrozenLayer", "FrozenConv2d", "FrozenLinear", "frozen_layer", "freeze_weights", "input_channels",
    "accumulator_bound", "exact_dtype", "input_codes", "codes_from_values", "input_values", "accumulate",
    "offset_window", "offset_accumulator", "rescale", "integer_output", "describe", "integer_module",
    "IntegerLayer", "IntegerConv2d", "IntegerLinear", "INTEGER_MODULES", "TENSOR_FIELDS",
]


# -- the description -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class FrozenLayer:
    """One frozen layer as data: what the freeze pass produces and every backend and kernel reads.

    Tensors are detached and contiguous, on the device of the quantizers they came from: ``weight_int``
    int32 and ``weight_codes`` uint8 in the layer's weight shape; ``weight_scale``, ``bias``, ``out_scale``
    (``input_step * weight_scale``) and ``offset_scale`` (``input_low * weight_scale``) float32 per output
    channel; ``input_low`` and ``input_step`` float32 scalars; ``input_thresholds`` float32 code boundaries
    of a threshold quantizer; ``input_levels`` (float32 real values) and ``input_levels_int`` (int32 lookup
    values) for codebook inputs. Build one with :func:`frozen_layer`.
    """

    name: str
    weight_bits: int
    weight_encoding: str
    act_bits: int
    weight_int: torch.Tensor
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor
    input_low: torch.Tensor
    input_step: torch.Tensor
    out_scale: torch.Tensor
    offset_scale: torch.Tensor
    input_thresholds: torch.Tensor | None = None
    input_levels: torch.Tensor | None = None
    input_levels_int: torch.Tensor | None = None


@dataclass(frozen=True, eq=False, kw_only=True)
class FrozenConv2d(FrozenLayer):
    """A frozen 2-D convolution: ``weight_int`` is ``(out, in / groups, kh, kw)``; padding as torch takes it."""

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int


@dataclass(frozen=True, eq=False, kw_only=True)
class FrozenLinear(FrozenLayer):
    """A frozen linear layer: ``weight_int`` is ``(out, in)``; inputs are ``(..., in)``."""


#: the fields of a description that hold tensors (the buffers of an :class:`IntegerLayer`)
TENSOR_FIELDS = (
    "weight_int", "weight_codes", "weight_scale", "bias", "input_low", "input_step", "out_scale", "offset_scale",
    "input_thresholds", "input_levels", "input_levels_int",
)


def frozen_layer(
    kind: type[FrozenLayer],
    *,
    weight_int: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    weight_bits: int,
    weight_encoding: str,
    act_bits: int,
    input_low: torch.Tensor,
    input_step: torch.Tensor,
    input_thresholds: torch.Tensor | None = None,
    name: str = "",
    input_levels: torch.Tensor | None = None,
    input_levels_int: torch.Tensor | None = None,
    **geometry: Any,
) -> FrozenLayer:
    """The description of a frozen layer of ``kind`` in canonical dtypes and shapes (``geometry``: the
    convolution's ``stride``, ``padding``, ``dilation`` and ``groups``)."""
    out_channels = weight_int.shape[0]
    scale = weight_scale.detach().float().reshape(-1).expand(out_channels).contiguous()
    low = input_low.detach().float().reshape(())
    step = input_step.detach().float().reshape(())
    if kind is FrozenConv2d:
        padding = geometry["padding"]
        geometry = {
            "stride": tuple(geometry["stride"]),
            "padding": padding if isinstance(padding, str) else tuple(padding),
            "dilation": tuple(geometry["dilation"]),
            "groups": int(geometry["groups"]),
        }
    return kind(
        name=name,
        weight_bits=int(weight_bits),
        weight_encoding=weight_encoding,
        act_bits=int(act_bits),
        weight_int=weight_int.detach().to(torch.int32).contiguous(),
        weight_codes=weight_codes.detach().to(torch.uint8).contiguous(),
        weight_scale=scale,
        bias=(torch.zeros(out_channels) if bias is None else bias.detach().float().reshape(-1)).contiguous(),
        input_low=low,
        input_step=step,
        out_scale=(step * scale).contiguous(),
        offset_scale=(low * scale).contiguous(),
        input_thresholds=None if input_thresholds is None else input_thresholds.detach().float(),
        input_levels=None if input_levels is None else input_levels.detach().float(),
        input_levels_int=None if input_levels_int is None else input_levels_int.detach().to(torch.int32).contiguous(),
        **geometry,
    )


def freeze_weights(
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_quant: Quantizer,
    input_quant: Quantizer,
    name: str = "",
) -> FrozenLayer:
    """Hard-quantize one conv/linear ``layer`` whose deployed weight and bias are ``weight``, ``bias``: the
    description the freeze pass records and a QAT layer's eval forward computes with."""
    with torch.no_grad():
        weight_quant.track_weight(weight)
        w_grid, a_grid = weight_quant.grid(), input_quant.grid()
        codes = weight_quant.codes(weight)
        weight_int, weight_scale = weight_quant.integer_weight(codes)
        codebook = a_grid.encoding == "codebook"
        common: dict[str, Any] = dict(
            weight_int=weight_int,
            weight_codes=codes,
            weight_scale=weight_scale,
            bias=bias,
            weight_bits=weight_quant.bits,
            weight_encoding=w_grid.encoding,
            act_bits=input_quant.bits,
            input_low=a_grid.low,
            input_step=a_grid.step,
            input_thresholds=a_grid.thresholds,
            name=name,
            input_levels=a_grid.levels if codebook else None,
            input_levels_int=a_grid.levels_int if codebook else None,
        )
        if isinstance(layer, nn.Conv2d):
            conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            return frozen_layer(FrozenConv2d, **common, **conv)
        return frozen_layer(FrozenLinear, **common)


# -- the arithmetic over a description ------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """What differs between conv and linear layers in the reference arithmetic and in reports."""

    module_name: str  # the ``kind`` manifests and reports show
    input_channels: Callable[[Any], int]
    accumulate: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
    window: Callable[[tuple[int, ...]], tuple[int, ...]]  # the part of the input shape the offset term sees
    channel_shape: Callable[[int], list[int]]  # how per-channel vectors broadcast against an accumulator
    geometry: Callable[[Any], dict[str, Any]]


_KINDS: dict[type[FrozenLayer], _Kind] = {
    FrozenConv2d: _Kind(
        "IntegerConv2d",
        input_channels=lambda f: f.weight_int.shape[1] * f.groups,
        accumulate=lambda f, x, w: F.conv2d(x, w, None, f.stride, f.padding, f.dilation, f.groups),
        window=lambda shape: tuple(shape[1:]),
        channel_shape=lambda rank: [1, -1] + [1] * (rank - 2),
        geometry=lambda f: {
            "stride": list(f.stride),
            "padding": list(f.padding) if not isinstance(f.padding, str) else f.padding,
            "dilation": list(f.dilation),
            "groups": f.groups,
        },
    ),
    FrozenLinear: _Kind(
        "IntegerLinear",
        input_channels=lambda f: f.weight_int.shape[1],
        accumulate=lambda f, x, w: F.linear(x, w),
        window=lambda shape: (shape[-1],),
        channel_shape=lambda rank: [-1],
        geometry=lambda f: {},
    ),
}


def _kind(f: FrozenLayer) -> _Kind:
    return _KINDS[type(f)]


def input_channels(f: FrozenLayer) -> int:
    """Channels (conv, dim 1) or features (linear, last dim) the layer's input must have."""
    return _kind(f).input_channels(f)


def accumulator_bound(f: FrozenLayer) -> int:
    """Largest possible |accumulator|: window size × largest code × largest |weight|."""
    window = f.weight_int[0].numel()
    largest = 2**f.act_bits - 1 if f.input_levels_int is None else _peak(f.input_levels_int)
    return window * largest * _peak(f.weight_int)


def _peak(t: torch.Tensor) -> int:
    """``max |t|`` of an integer tensor, in one pass (backends ask for it per layer, the weights can be large)."""
    low, high = t.aminmax()
    return max(-int(low), int(high))


def exact_dtype(f: FrozenLayer) -> torch.dtype:
    """float32 while every partial sum stays below 2**24 (then any summation order is exact), else float64."""
    return torch.float32 if accumulator_bound(f) < 2**24 else torch.float64


def input_codes(f: FrozenLayer, x: torch.Tensor) -> torch.Tensor:
    """Codes of a float input: comparisons with the thresholds, else rounding on the uniform grid."""
    if f.input_thresholds is not None:
        return threshold_codes(x, f.input_thresholds)
    return uniform_codes(x, f.input_low, f.input_step, f.act_bits)


def codes_from_values(f: FrozenLayer, x: torch.Tensor) -> torch.Tensor:
    """Codes of an input that is already quantized (the prepared model's input quantizer output)."""
    if f.input_levels is not None:
        return level_codes(x, f.input_levels)
    return uniform_codes(x, f.input_low, f.input_step, f.act_bits)


def input_values(f: FrozenLayer, codes: torch.Tensor) -> torch.Tensor:
    """The integers the accumulator multiplies: the codes, or their lookup values for codebook inputs."""
    if f.input_levels_int is None:
        return codes
    return f.input_levels_int[codes.long()].to(codes.dtype)


def accumulate(f: FrozenLayer, values: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulator (int64): sums of integers in float are exact below 2**24 / 2**53."""
    dtype = exact_dtype(f)
    return _kind(f).accumulate(f, values.to(dtype), f.weight_int.to(dtype)).round().to(torch.int64)


def offset_window(f: FrozenLayer, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The part of an input shape the offset accumulator depends on (its cache key)."""
    return _kind(f).window(tuple(input_shape))


def offset_accumulator(f: FrozenLayer, input_shape: tuple[int, ...]) -> torch.Tensor | None:
    """``Σ 1 · w_int`` over each (zero-padded) window of an input of ``input_shape``; None when ``input_low`` is 0."""
    if float(f.input_low) == 0.0:
        return None
    return accumulate(f, torch.ones((1, *offset_window(f, input_shape)), device=f.weight_int.device))


def rescale(f: FrozenLayer, acc: torch.Tensor, offset_acc: torch.Tensor | None) -> torch.Tensor:
    """``acc · out_scale + (offset_acc · offset_scale + bias)`` in float32, in this order."""
    shape = _kind(f).channel_shape(acc.dim())
    const = f.bias.reshape(shape)
    if offset_acc is not None:
        const = offset_acc.to(torch.float32) * f.offset_scale.reshape(shape) + const
    return acc.to(torch.float32) * f.out_scale.reshape(shape) + const


def integer_output(f: FrozenLayer, codes: torch.Tensor, offset_acc: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's float output from input codes: exact accumulation, then the float32 rescale
    (``offset_acc``: a cached :func:`offset_accumulator` for this input shape)."""
    if offset_acc is None:
        offset_acc = offset_accumulator(f, tuple(codes.shape))
    return rescale(f, accumulate(f, input_values(f, codes)), offset_acc)


def describe(f: FrozenLayer) -> dict[str, Any]:
    """Per-layer facts for manifests and reports."""
    return {
        "name": f.name,
        "kind": _kind(f).module_name,
        "weight_bits": f.weight_bits,
        "act_bits": f.act_bits,
        "weight_encoding": f.weight_encoding,
        "input_low": float(f.input_low),
        "input_step": float(f.input_step),
        "input_thresholds": f.input_thresholds is not None,
        "input_codebook": f.input_levels_int is not None,
        "weight_shape": list(f.weight_int.shape),
        **_kind(f).geometry(f),
    }


# -- the torch reference module --------------------------------------------------------------------------


class IntegerLayer(nn.Module):
    """A frozen layer the integer graph calls: its description's tensors as buffers, the arithmetic above.

    Build it from a description (``integer_module(frozen)``) or from the description's fields
    (``IntegerConv2d(weight_int=..., stride=..., ...)``, as :func:`frozen_layer` takes them).
    """

    KIND: ClassVar[type[FrozenLayer]]

    def __init__(self, frozen: FrozenLayer | None = None, **fields_: Any):
        super().__init__()
        frozen = frozen if frozen is not None else frozen_layer(self.KIND, **fields_)
        if type(frozen) is not self.KIND:
            raise TypeError(f"{type(self).__name__} holds a {self.KIND.__name__}, not a {type(frozen).__name__}")
        for field in fields(frozen):
            value = getattr(frozen, field.name)
            if field.name in TENSOR_FIELDS:
                self.register_buffer(field.name, value)
            else:
                setattr(self, field.name, value)
        self._offset_cache: dict[tuple[int, ...], torch.Tensor | None] = {}

    @property
    def frozen(self) -> FrozenLayer:
        """The layer's description, read from its current buffers (so it follows ``.to(device)``)."""
        return self.KIND(**{field.name: getattr(self, field.name) for field in fields(self.KIND)})

    @property
    def input_channels(self) -> int:
        return input_channels(self.frozen)

    @property
    def accumulator_bound(self) -> int:
        return accumulator_bound(self.frozen)

    @property
    def exact_dtype(self) -> torch.dtype:
        return exact_dtype(self.frozen)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        return input_codes(self.frozen, x)

    def codes_from_values(self, x: torch.Tensor) -> torch.Tensor:
        return codes_from_values(self.frozen, x)

    def input_values(self, codes: torch.Tensor) -> torch.Tensor:
        return input_values(self.frozen, codes)

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        return accumulate(self.frozen, codes)

    def offset_accumulator(self, x: torch.Tensor) -> torch.Tensor | None:
        """:func:`offset_accumulator` for ``x``'s shape, computed once per shape."""
        frozen = self.frozen
        key = offset_window(frozen, tuple(x.shape))
        if key not in self._offset_cache:
            self._offset_cache[key] = offset_accumulator(frozen, tuple(x.shape))
        return self._offset_cache[key]

    def rescale(self, acc: torch.Tensor, offset_acc: torch.Tensor | None) -> torch.Tensor:
        return rescale(self.frozen, acc, offset_acc)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise InputError(f"layer {self.name or type(self).__name__}: expected float32 input, got {x.dtype}")
        if x.dim() < 2 or x.shape[1] != self.input_channels:
            raise InputError(
                f"layer {self.name or type(self).__name__}: expected {self.input_channels} input channels "
                f"(dim 1), got shape {tuple(x.shape)}"
            )

    def integer_output(self, codes: torch.Tensor) -> torch.Tensor:
        return integer_output(self.frozen, codes, self.offset_accumulator(codes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.integer_output(self.input_codes(x))

    def describe(self) -> dict[str, Any]:
        return describe(self.frozen)


class IntegerConv2d(IntegerLayer):
    KIND = FrozenConv2d


class IntegerLinear(IntegerLayer):
    KIND = FrozenLinear

    def check_input(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise InputError(f"layer {self.name or 'linear'}: expected float32 input, got {x.dtype}")
        if x.shape[-1] != self.input_channels:
            raise InputError(
                f"layer {self.name or 'linear'}: expected {self.input_channels} input features (last dim), "
                f"got shape {tuple(x.shape)}"
            )


#: the reference module of each description kind
INTEGER_MODULES: dict[type[FrozenLayer], type[IntegerLayer]] = {
    FrozenConv2d: IntegerConv2d,
    FrozenLinear: IntegerLinear,
}


def integer_module(frozen: FrozenLayer) -> IntegerLayer:
    """The runnable torch module of a description (the torch backend's form of the layer)."""
    return INTEGER_MODULES[type(frozen)](frozen)
