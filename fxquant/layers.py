"""Layer modules that the passes put into the graph during preparation.

- :class:`FusedBn`: a float conv/linear followed by its batch norm, as one node (the input of QAT folding).
- :class:`QuantLayer`: a conv/linear whose weight goes through a quantizer; with a batch norm attached it
  follows Jacob et al. (2018): the quantizer sees the weight folded with the *running* statistics, the
  output is unscaled again and the batch norm runs on batch statistics in training (so they keep
  updating), and in eval the layer is exactly the folded conv. Its ``input_quant`` is called by its own
  graph node just before the layer, so activation fake-quant stays visible in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.integer import FrozenLayer, codes_from_values, freeze_weights, integer_output
from fxquant.placement import autocast_dtype
from fxquant.quantizers.base import Quantizer, add_flag, read_flag, refresh_flags

__all__ = ["FusedBn", "QuantLayer", "fold_bn_into", "QUANTIZABLE_TYPES", "layer_type_name"]

QUANTIZABLE_TYPES = (nn.Conv2d, nn.Linear)


def layer_type_name(module: nn.Module) -> str:
    """The type name override keys use (``type:Conv2d``), looking through fusion and quantization."""
    inner = getattr(module, "layer", module)
    return type(inner).__name__


def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(layer(x))`` as one layer, using the running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    weight = layer.weight * scale.reshape([-1] + [1] * (layer.weight.dim() - 1))
    return weight, (bias - bn.running_mean) * scale + shift


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _unbiased(x: torch.Tensor, weight: torch.Tensor, conv: tuple | None) -> torch.Tensor:
    return F.linear(x, weight) if conv is None else F.conv2d(x, weight, None, *conv)


class _UnscaledLayer(torch.autograd.Function):
    """``layer(x, w) / f`` with ``f`` per output channel: the QAT conv (or linear) with its output unscaled.

    The forward is the layer followed by the division, done in place on its fresh output. The backward
    never forms ``grad / f`` over the feature map: the layer is linear in its weight, so the input gradient
    is the transposed layer applied to ``grad`` with weight ``w / f``, the weight gradient is ``G / f`` with
    ``G`` the weight gradient for ``grad``, and ``∂/∂f = −Σ grad·y/f² = −⟨G, w⟩/f²`` per channel (because
    ``Σ grad·y = ⟨G, w⟩``). Only weight-sized tensors are added to the layer's own backward, where
    autograd's division costs five passes over the feature map and a temporary the size of it.
    ``conv`` is ``(stride, padding, dilation, groups)``, or ``None`` for a linear layer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, conv: tuple | None) -> torch.Tensor:
        # under autocast the layer runs in its dtype (the backward too); weight and factor gradients stay float32
        if (dtype := autocast_dtype(x.device.type)) is not None:
            x = x.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = _unbiased(x, weight.to(dtype), conv)
        else:
            y = _unbiased(x, weight, conv)
        y.div_(factor.reshape([1, -1] + [1] * (y.dim() - 2)))
        ctx.save_for_backward(x, weight, factor)
        ctx.conv = conv
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, factor = ctx.saved_tensors
        need_x, need_w, need_f = ctx.needs_input_grad[:3]
        per_channel = factor.reshape([-1] + [1] * (weight.dim() - 1))
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_f = g_weight = None
        if ctx.conv is None:
            if need_x:
                grad_x = grad.matmul((weight / per_channel).to(x.dtype))
            if need_w or need_f:
                g_weight = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        elif need_x or need_w or need_f:
            stride, padding, dilation, groups = ctx.conv
            grad_x, g_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, (weight / per_channel if need_x else weight).to(x.dtype), None, list(stride), list(padding),
                list(dilation), False, [0] * len(stride), groups, [need_x, need_w or need_f, False],
            )
        if g_weight is not None:
            g_weight = g_weight.to(weight.dtype)
        if need_w:
            grad_w = g_weight / per_channel
        if need_f:
            grad_f = -(g_weight * weight).sum(list(range(1, weight.dim()))) / (factor * factor)
        return grad_x, grad_w, grad_f, None


@torch.compiler.disable
def _running_fold_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``γ / sqrt(running_var + eps)``, run eagerly even under ``torch.compile``.

    The batch norm updates ``running_var`` in place later in the same step. Compiled, AOT autograd would
    recompute this factor in the backward from the running variance it took as a graph input (it is cheap
    to recompute) and so read the updated statistics: a version-counter error across graph breaks, or a
    silently wrong gradient for γ inside one graph. Eager autograd saves this fresh tensor instead.
    """
    running_std = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / running_std if bn.affine else 1.0 / running_std


class FusedBn(nn.Module):
    """``bn(layer(x))`` kept as one module so that later passes treat the pair as one layer."""

    def __init__(self, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.layer(x))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn_into(self.layer, self.bn)


class QuantLayer(nn.Module):
    """A conv2d or linear layer with fake-quantized weights (and the quantizer of its input).

    In training the layer computes in float32 on fake-quantized values (differentiable). In eval it runs
    the deployed integer arithmetic of :mod:`fxquant.integer` on the codes of its (already quantized)
    input, so the accuracy measured in eval is bit for bit that of ``convert(backend="torch")``.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_quant: Quantizer,
        input_quant: Quantizer,
        bn: nn.modules.batchnorm._BatchNorm | None = None,
    ):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE_TYPES):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, not {type(layer).__name__}")
        self.layer = layer
        self.bn = bn
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        # with frozen statistics, training folds the running statistics too (no batch-statistics path)
        add_flag(self, "bn_frozen", False)

    def freeze(self, name: str = "") -> FrozenLayer:
        """The deployed integer layer as data (running BN statistics folded in): what ``freeze`` records."""
        with torch.no_grad():
            weight, bias = self.folded_weight_bias()
            return freeze_weights(self.layer, weight, bias, self.weight_quant, self.input_quant, name)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        refresh_flags(self)  # bn_frozen comes from the loaded buffer

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval path: recover the input codes (``x`` is on the input grid) and run the integer arithmetic."""
        if not bool(self.weight_quant.initialized):
            with torch.no_grad():
                self.weight_quant.ensure_initialized(self.folded_weight_bias()[0])
        frozen = self.freeze()
        return integer_output(frozen, codes_from_values(frozen, x))

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight the quantizer sees and the bias of the deployed layer (running BN statistics)."""
        if self.bn is None:
            return self.layer.weight, self.layer.bias
        return fold_bn_into(self.layer, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.integer_forward(x)
        if self.bn is None or read_flag(self, "bn_frozen"):
            weight, bias = self.folded_weight_bias()
            return _apply(self.layer, x, self.weight_quant(weight), bias)
        bn = self.bn
        factor = _running_fold_factor(bn)
        shape = [-1] + [1] * (self.layer.weight.dim() - 1)
        weight = self.weight_quant(self.layer.weight * factor.reshape(shape))
        layer = self.layer
        if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, str):  # no explicit padding to hand back
            y = _apply(layer, x, weight, None)
            y = y / factor.reshape([1, -1] + [1] * (y.dim() - 2))
        else:
            conv = (layer.stride, layer.padding, layer.dilation, layer.groups) if isinstance(layer, nn.Conv2d) else None
            y = _UnscaledLayer.apply(x, weight, factor, conv)
        out_shape = [1, -1] + [1] * (y.dim() - 2)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(out_shape)
        return bn(y)
