"""Transformer and ConvNeXt families on ``tvm-llvm``: one small model per torchvision family, exact against the
integer reference; attention reported as float; tensor indexing; the converter registration hook."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models import convnext, maxvit, swin_transformer, vision_transformer
from tvm import relax

import fxquant
from fxquant.backends.tvm.lower import FUNCTION_CONVERTERS, MODULE_CONVERTERS, register_converter
from fxquant.errors import ConfigError, UnsupportedOpError
from fxquant.passes.freeze import integer_layers
from tests.backends.tvm.helpers import assert_matches_reference, quantized

#: the smallest member of each family that keeps its structure (shifted windows, class token, layer scale)
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: vision_transformer.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ),
    "convnext": lambda: convnext.ConvNeXt(
        [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)], num_classes=10
    ),
    # 8x8 tokens in 4x4 windows: the second block of the first stage shifts them; then patch merging
    "swin": lambda: swin_transformer.SwinTransformer([4, 4], 16, [2, 1], [2, 2], [4, 4], num_classes=10),
    # v2 (cosine attention, position-bias MLP): one stage with a plain and a shifted block
    "swin_v2": lambda: swin_transformer.SwinTransformer(
        [4, 4], 16, [2], [2], [4, 4], num_classes=10, block=swin_transformer.SwinTransformerBlockV2,
    ),
    # MBConv with squeeze-excitation, then block and grid attention (swapaxes) over 4x4 partitions of 8x8 tokens
    "maxvit": lambda: maxvit.MaxVit(
        (32, 32), stem_channels=8, partition_size=4, block_channels=[16], block_layers=[1], head_dim=8,
        stochastic_depth_prob=0.0, num_classes=10,
    ),
}
ATTENTION_KINDS = {"MultiheadAttention", "shifted_window_attention", "matmul", "einsum", "scaled_dot_product_attention"}
#: layers whose input is a build-time constant (computed from buffers only): Swin v2's position-bias MLP
CONSTANT_LAYERS = {"swin_v2": "*.attn.cpb_mlp.*"}


def _convert(model: nn.Module, x: torch.Tensor, **options: object) -> tuple[nn.Module, object]:
    q = quantized(model, x, weight_bits=2, act_bits=2)
    ref = fxquant.convert(q, backend="torch")
    return ref, fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, cost_model="model", **options)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_integer_reference(family: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ref, mod = _convert(FAMILIES[family](), x)
    assert_matches_reference(mod, ref, x)

    layers = {entry["name"]: entry for entry in mod.manifest["layers"]}
    integer = integer_layers(ref)
    assert set(integer) <= set(layers)
    tokens = [layers[name] for name, layer in integer.items() if "leading_shape" in layers[name]]
    if family != "convnext":  # linear layers on (B, T, C) or (B, H, W, C) tokens got integer kernels
        assert tokens and all(entry["kernel"] != "float" for entry in tokens)
    floats = [entry for name, entry in layers.items() if name not in integer]
    assert all(entry["kernel"] == "float" and entry["reason"] for entry in floats)
    if family != "convnext":
        assert {entry["kind"] for entry in floats} & ATTENTION_KINDS
    # constant inputs are folded while building, for a generic CPU: the portable kernel only, the others declined
    constant = {name for name, entry in layers.items() if entry.get("constant_input")}
    assert constant == {name for name in integer if fnmatch.fnmatchcase(name, CONSTANT_LAYERS.get(family, ""))}
    assert all(layers[name]["kernel"] == "direct" and "build-time constant" in layers[name]["reason"]
               for name in constant)


class Indexing(nn.Module):
    """Class-token slicing, strided slices, new axes and a gather, around a quantized linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("order", torch.tensor([2, 0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 5, 8)
        y = self.fc(x[..., 1:7])  # (B, 5, 4)
        first = y[:, 0]
        picked = y[:, self.order]  # (B, 3, 4)
        strided = y[:, 1::2, None, -2:]  # (B, 2, 1, 2)
        return torch.cat([first, picked.flatten(1), strided.flatten(1), torch.roll(first, 1, 1)], dim=1)


def test_tensor_indexing_and_roll_match_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    ref, mod = _convert(Indexing(), x)
    assert_matches_reference(mod, ref, x)


class Swapped(nn.Module):
    """``transpose``'s aliases around a quantized linear layer, by position and by keyword (MaxViT: swapaxes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, 5, 8)
        y = self.fc(torch.swapaxes(x, 1, 2))  # (B, 5, 4, 6)
        return torch.cat([torch.swapaxes(y, axis0=-1, axis1=1).flatten(1), y.swapdims(1, 3).flatten(1),
                          torch.swapdims(y, dim0=2, dim1=1).flatten(1)], dim=1)


def test_swapped_axes_match_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 8)
    ref, mod = _convert(Swapped(), x)
    assert_matches_reference(mod, ref, x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Unknown(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = Scale(0.5)
        self.other = Unknown()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.other(self.scale(self.fc(x))))


def test_register_converter_for_a_custom_module() -> None:
    x = torch.randn(2, 8)
    q = quantized(WithCustom(), x, weight_bits=4, act_bits=4, leaf_modules=["scale", "other"])
    with pytest.raises(UnsupportedOpError) as missing:  # both custom leaves, reported together
        fxquant.convert(q, backend="tvm-llvm", cost_model="model")
    assert "scale" in str(missing.value) and "other" in str(missing.value)

    def emit_scale(ctx, node):
        factor = relax.const(ctx.module(node).factor, "float32")
        return ctx.bb.emit(relax.op.multiply(ctx.value(node.args[0]), factor))

    register_converter(Scale, emit_scale)
    register_converter(Unknown, lambda ctx, node: ctx.bb.emit(
        relax.op.add(ctx.value(node.args[0]), relax.const(1.0, "float32"))))
    try:
        with pytest.raises(ConfigError, match="already has a converter"):
            register_converter(Scale, emit_scale)
        mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, cost_model="model")
        assert_matches_reference(mod, fxquant.convert(q, backend="torch"), x)
    finally:
        MODULE_CONVERTERS.pop(Scale)
        MODULE_CONVERTERS.pop(Unknown)
    with pytest.raises(ConfigError, match="not a module class"):
        register_converter(3, emit_scale)
    assert torch.matmul in FUNCTION_CONVERTERS
