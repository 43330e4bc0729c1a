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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import InputError
from fxquant.quantizers.grid import level_codes, threshold_codes, uniform_codes

__all__ = ["IntegerLayer", "IntegerConv2d", "IntegerLinear"]


class IntegerLayer(nn.Module):
    """Shared state of frozen layers; subclasses define the integer accumulation."""

    def __init__(
        self,
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
    ):
        super().__init__()
        out_channels = weight_int.shape[0]
        self.name = name
        self.weight_bits = int(weight_bits)
        self.weight_encoding = weight_encoding
        self.act_bits = int(act_bits)
        self.register_buffer("weight_int", weight_int.to(torch.int32).contiguous())
        self.register_buffer("weight_codes", weight_codes.to(torch.uint8).contiguous())
        scale = weight_scale.detach().float().reshape(-1).expand(out_channels).contiguous()
        self.register_buffer("weight_scale", scale)
        bias = torch.zeros(out_channels) if bias is None else bias.detach().float().reshape(-1)
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("input_low", input_low.detach().float().reshape(()))
        self.register_buffer("input_step", input_step.detach().float().reshape(()))
        self.register_buffer("out_scale", (self.input_step * scale).contiguous())
        self.register_buffer("offset_scale", (self.input_low * scale).contiguous())
        self.input_thresholds: torch.Tensor | None
        self.register_buffer("input_thresholds", None if input_thresholds is None else input_thresholds.float())
        # codebook inputs: the real value of each code in the prepared model, and its integer lookup value
        self.input_levels: torch.Tensor | None
        self.input_levels_int: torch.Tensor | None
        self.register_buffer("input_levels", None if input_levels is None else input_levels.detach().float())
        self.register_buffer(
            "input_levels_int", None if input_levels_int is None else input_levels_int.to(torch.int32).contiguous()
        )
        self._offset_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # -- the reference arithmetic -------------------------------------------------------------------------

    @property
    def input_channels(self) -> int:
        raise NotImplementedError

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_thresholds is not None:
            return threshold_codes(x, self.input_thresholds)
        return uniform_codes(x, self.input_low, self.input_step, self.act_bits)

    def codes_from_values(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of an input that is already quantized (the prepared model's input quantizer output)."""
        if self.input_levels is not None:
            return level_codes(x, self.input_levels)
        return uniform_codes(x, self.input_low, self.input_step, self.act_bits)

    def input_values(self, codes: torch.Tensor) -> torch.Tensor:
        """The integers the accumulator multiplies: the codes, or their lookup values for codebook inputs."""
        if self.input_levels_int is None:
            return codes
        return self.input_levels_int[codes.long()].to(codes.dtype)

    def _accumulate(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def accumulator_bound(self) -> int:
        """Largest possible |accumulator|: window size × largest code × largest |weight|."""
        window = self.weight_int[0].numel()
        largest = 2**self.act_bits - 1 if self.input_levels_int is None else int(self.input_levels_int.abs().max())
        return window * largest * int(self.weight_int.abs().max())

    @property
    def exact_dtype(self) -> torch.dtype:
        """float32 while every partial sum stays below 2**24 (then any summation order is exact), else float64."""
        return torch.float32 if self.accumulator_bound < 2**24 else torch.float64

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """Exact integer accumulator (int64): sums of integers in float are exact below 2**24 / 2**53."""
        dtype = self.exact_dtype
        return self._accumulate(codes.to(dtype), self.weight_int.to(dtype)).round().to(torch.int64)

    def offset_accumulator(self, x: torch.Tensor) -> torch.Tensor | None:
        if float(self.input_low) == 0.0:
            return None
        key = tuple(x.shape[1:])
        if key not in self._offset_cache:
            self._offset_cache[key] = self.accumulate(torch.ones((1, *key)))
        return self._offset_cache[key]

    def rescale(self, acc: torch.Tensor, offset_acc: torch.Tensor | None) -> torch.Tensor:
        shape = [1, -1] + [1] * (acc.dim() - 2)
        const = self.bias.reshape(shape)
        if offset_acc is not None:
            const = offset_acc.to(torch.float32) * self.offset_scale.reshape(shape) + const
        return acc.to(torch.float32) * self.out_scale.reshape(shape) + const

    def check_input(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise InputError(f"layer {self.name or type(self).__name__}: expected float32 input, got {x.dtype}")
        if x.dim() < 2 or x.shape[1] != self.input_channels:
            raise InputError(
                f"layer {self.name or type(self).__name__}: expected {self.input_channels} input channels "
                f"(dim 1), got shape {tuple(x.shape)}"
            )

    def integer_output(self, codes: torch.Tensor) -> torch.Tensor:
        """The layer's float output from input codes: exact accumulation, then the float32 rescale."""
        return self.rescale(self.accumulate(self.input_values(codes)), self.offset_accumulator(codes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.integer_output(self.input_codes(x))

    def describe(self) -> dict[str, Any]:
        """Per-layer facts for manifests and reports."""
        return {
            "name": self.name,
            "kind": type(self).__name__,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "weight_encoding": self.weight_encoding,
            "input_low": float(self.input_low),
            "input_step": float(self.input_step),
            "input_thresholds": self.input_thresholds is not None,
            "input_codebook": self.input_levels_int is not None,
            "weight_shape": list(self.weight_int.shape),
        }


class IntegerConv2d(IntegerLayer):
    def __init__(self, *, stride, padding, dilation, groups, **kwargs):
        super().__init__(**kwargs)
        self.stride = tuple(stride)
        self.padding = tuple(padding) if not isinstance(padding, str) else padding
        self.dilation = tuple(dilation)
        self.groups = int(groups)

    @property
    def input_channels(self) -> int:
        return self.weight_int.shape[1] * self.groups

    def _accumulate(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(codes, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "stride": list(self.stride),
            "padding": list(self.padding) if not isinstance(self.padding, str) else self.padding,
            "dilation": list(self.dilation),
            "groups": self.groups,
        }


class IntegerLinear(IntegerLayer):
    @property
    def input_channels(self) -> int:
        return self.weight_int.shape[1]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise InputError(f"layer {self.name or 'linear'}: expected float32 input, got {x.dtype}")
        if x.shape[-1] != self.input_channels:
            raise InputError(
                f"layer {self.name or 'linear'}: expected {self.input_channels} input features (last dim), "
                f"got shape {tuple(x.shape)}"
            )

    def _accumulate(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(codes, weight)

    def rescale(self, acc: torch.Tensor, offset_acc: torch.Tensor | None) -> torch.Tensor:
        const = self.bias
        if offset_acc is not None:
            const = offset_acc.to(torch.float32) * self.offset_scale + const
        return acc.to(torch.float32) * self.out_scale + const

    def offset_accumulator(self, x: torch.Tensor) -> torch.Tensor | None:
        if float(self.input_low) == 0.0:
            return None
        key = (x.shape[-1],)
        if key not in self._offset_cache:
            self._offset_cache[key] = self.accumulate(torch.ones((1, *key)))
        return self._offset_cache[key]
