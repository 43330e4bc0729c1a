"""``tvm-llvm`` on whole networks: exact accumulators, float32-close outputs, identical top-1, honest manifest."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

import fxquant
from fxquant.passes.freeze import integer_layers
from tests.backends.tvm.helpers import ResidualNet, assert_matches_reference, quantized

KERNELS = {"bitserial", "dot", "direct", "float"}


def _cifar_resnet() -> nn.Module:
    from fxquant.models import resnet20

    return resnet20(num_classes=10)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "cifar_resnet20": (_cifar_resnet, 32),
    "residual_net": (ResidualNet, 32),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_network_matches_integer_reference(name: str) -> None:
    build, size = MODELS[name]
    x = torch.randn(2, 3, size, size)
    q = quantized(build(), x, weight_bits=2, act_bits=2)
    ref = fxquant.convert(q, backend="torch")
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True)

    assert_matches_reference(mod, ref, x)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5 * float(ref(x).abs().max()))

    layers = {entry["name"]: entry for entry in mod.manifest["layers"]}
    assert set(layers) == set(integer_layers(ref))  # every integer layer is reported, none invented
    for entry in layers.values():
        assert entry["kernel"] in KERNELS
        assert entry["reason"], f"{entry['name']}: no reason given for kernel {entry['kernel']}"
        costs = entry["kernel_costs_us"]
        if len(costs) > 1:  # chosen by timing: the cheapest timed kernel, and its time is the estimate
            assert entry["estimate_us"] == min(costs.values()) == costs[entry["kernel"]]
    # the 8-bit first/last layers always have the int8 dot kernel among their candidates (which one wins on
    # layers this small is the timing's call: on a Zen 4 host an 8-bit bit-serial fc can be the fastest)
    eight_bit = [e for e in layers.values() if e["weight_bits"] == 8]
    assert eight_bit and all("dot" in e["kernel_costs_us"] or e["kernel"] == "dot" for e in eight_bit)
    assert mod.manifest["unscheduled_functions"] == []
    assert all(name in mod.report() for name in layers)
