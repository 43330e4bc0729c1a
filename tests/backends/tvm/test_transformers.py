"""Transformer and ConvNeXt families on ``tvm-llvm``: one small model per torchvision family, exact against the
integer reference; attention reported as float; tensor indexing; the converter registration hook."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models import convnext, swin_transformer, vision_transformer
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
}
ATTENTION_KINDS = {"MultiheadAttention", "shifted_window_attention", "matmul", "einsum", "scaled_dot_product_attention"}


#: the dot kernel for a 2-output dense layer (Swin v2's position-bias MLP) aborts LLVM; the direct kernel is exact
OPTIONS: dict[str, dict] = {"swin_v2": {"kernel": {"*cpb_mlp*": "direct"}}}


def _convert(model: nn.Module, x: torch.Tensor, **options: object) -> tuple[nn.Module, object]:
    q = quantized(model, x, weight_bits=2, act_bits=2)
    ref = fxquant.convert(q, backend="torch")
    return ref, fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, cost_model="model", **options)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_integer_reference(family: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ref, mod = _convert(FAMILIES[family](), x, **OPTIONS.get(family, {}))
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
