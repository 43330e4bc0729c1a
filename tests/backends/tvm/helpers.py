"""Shared helpers of the TVM backend tests: quantized models and comparisons against the integer reference."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

import fxquant
from fxquant.integer import IntegerLayer

__all__ = [
    "ResidualNet",
    "calibrated",
    "quantized",
    "reference_accumulators",
    "assert_matches_reference",
]


class ResidualNet(nn.Module):
    """A small CIFAR-style net: stem, two residual blocks (one strided with a 1x1 shortcut), a depthwise conv,
    max pooling, global pooling and a linear head."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(width)
        self.a2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(width)
        self.b1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.b1_bn = nn.BatchNorm2d(2 * width)
        self.b2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.b2_bn = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.a2_bn(self.a2(torch.relu(self.a1_bn(self.a1(x))))) + x)
        y = self.b2_bn(self.b2(torch.relu(self.b1_bn(self.b1(x)))))
        x = torch.relu(y + self.shortcut(x))
        x = self.pool(torch.relu(self.dw(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def calibrated(model: nn.Module, shape: tuple[int, ...], batches: int = 2) -> nn.Module:
    """Real batch-norm running statistics (random-init nets otherwise collapse in eval)."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape))
    return model.eval()


def quantized(model: nn.Module, x: torch.Tensor, **config: Any) -> fx.GraphModule:
    """``fxquant.prepare`` with calibrated batch norms, in eval mode; ``config`` goes to ``QuantConfig``."""
    calibrated(model, (8, *x.shape[1:]))
    return fxquant.prepare(model, (x,), fxquant.QuantConfig(**config)).eval()


def reference_accumulators(ref: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each integer layer's exact accumulator in the reference, computed from the input it really sees."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, args, _out, name=name: seen.__setitem__(name, args[0]))
        for name, module in ref.named_modules()
        if isinstance(module, IntegerLayer)
    ]
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, inp in seen.items():
        layer = ref.get_submodule(name)
        out[name] = layer.accumulate(layer.input_values(layer.input_codes(inp)))
    return out


def assert_matches_reference(mod: Any, ref: fx.GraphModule, x: torch.Tensor) -> None:
    """Accumulators equal exactly, outputs agree to float32 rounding, top-1 is identical."""
    out, accs = mod.run_with_accumulators(x)
    expected = reference_accumulators(ref, x)
    assert sorted(accs) == sorted(expected)
    for name, acc in accs.items():
        assert acc.dtype == torch.int32
        diff = int((acc.to(torch.int64) != expected[name]).sum())
        assert diff == 0, f"layer {name}: {diff} of {acc.numel()} accumulator values differ from the reference"
    with torch.no_grad():
        want = ref(x)
    scale = float(want.abs().max())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-6))
    assert torch.equal(out.argmax(dim=1), want.argmax(dim=1))
