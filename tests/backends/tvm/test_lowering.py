"""Graph translation: unsupported ops reported together, input shapes, options, kernel selection, float layers."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends.tvm import selection
from fxquant.backends.tvm.cost import KernelMismatch, KernelPlan
from fxquant.backends.tvm.lower import STAGE, unsupported_nodes
from fxquant.backends.tvm.selection import (
    BITSERIAL_MODULE,
    bitserial_module,
    bitserial_problem,
    choose_kernel,
    dot_problem,
    forced_kernel,
)
from fxquant.passes.freeze import frozen_layers
from tests.backends.tvm.helpers import ResidualNet, assert_matches_reference, quantized


class ThreeProblems(nn.Module):
    """A conv net with a Softmin module, a logcumsumexp call and an AvgPool2d with divisor_override (neither
    fxquant nor TVM's FX importer converts the first two)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Softmin(dim=1)
        self.pool = nn.AvgPool2d(2, divisor_override=3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool(self.act(self.conv(x)))
        y = torch.logcumsumexp(y, dim=1)
        return self.fc(y.mean((2, 3)))


def test_all_unsupported_ops_in_one_error() -> None:
    x = torch.randn(2, 3, 8, 8)
    q = quantized(ThreeProblems(), x, weight_bits=4, act_bits=4)
    with pytest.raises(fxquant.UnsupportedOpError) as info:
        fxquant.convert(q, backend="tvm-llvm")
    err = info.value
    assert err.stage == STAGE
    assert len(err.nodes) == 3, err.nodes
    text = str(err)
    assert "torch.nn.modules.activation.Softmin" in text and "no converter" in text
    assert "logcumsumexp" in text
    assert "divisor_override=3" in text
    assert unsupported_nodes(fxquant.passes.freeze(q)) == err.nodes


def test_training_mode_stochastic_depth_is_reported() -> None:
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = StochasticDepth(0.2, "row")

        def forward(self, x):
            return self.drop(self.conv(x)).flatten(1)

    x = torch.randn(2, 3, 6, 6)
    frozen = fxquant.passes.freeze(quantized(Net(), x, weight_bits=4, act_bits=4))
    assert unsupported_nodes(frozen) == []  # traced in eval: an identity
    (node,) = [n for n in frozen.graph.nodes if "stochastic_depth" in n.name]
    node.args = (*node.args[:3], True)
    (problem,) = unsupported_nodes(frozen)
    assert "stochastic_depth(p=0.2) in training mode" in problem


def test_input_shape_from_example_inputs_when_not_recorded() -> None:
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2)
    for node in q.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with pytest.raises(fxquant.BackendError, match="has no recorded shape.*example_inputs"):
        fxquant.convert(q, backend="tvm-llvm")
    x1 = torch.randn(1, 3, 16, 16)
    mod = fxquant.convert(q, backend="tvm-llvm", example_inputs=(x1,))
    assert mod.manifest["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    ref = fxquant.convert(q, backend="torch")
    torch.testing.assert_close(mod(x1), ref(x1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bitserial_max_bit": 4}, "unknown option.*bitserial_max_bit"),
        ({"bitserial_max_bits": 9}, "bitserial_max_bits=9"),
        ({"debug_accumulators": "yes"}, "debug_accumulators='yes'"),
        ({"target": "llvm"}, "target='llvm'"),
        ({"target": {"kind": "no-such-kind"}}, "not a valid TVM target"),
    ],
)
def test_bad_options_name_the_option(options: dict, message: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2)
    with pytest.raises(fxquant.ConfigError, match=message):
        fxquant.convert(q, backend="tvm-llvm", **options)


def test_tvm_arm_needs_output_dir() -> None:
    x = torch.randn(2, 3, 8, 8)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2)
    with pytest.raises(fxquant.ConfigError, match="output_dir"):
        fxquant.convert(q, backend="tvm-arm")


def _layers(bits: int = 2, groups: int = 1) -> dict:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    x = torch.randn(2, 8, 6, 6)
    q = quantized(Net(), x, weight_bits=bits, act_bits=bits, first_last_bits=None)
    return frozen_layers(fxquant.passes.freeze(q))


def test_bitserial_and_dot_reasons() -> None:
    conv = _layers(bits=2)["conv"]
    assert "not installed" in bitserial_problem(conv, enabled=True, max_bits=4, module=None)
    assert "bitserial=False" in bitserial_problem(conv, enabled=False, max_bits=4, module=None)
    accept = SimpleNamespace(bitserial_supported=lambda layer: (True, ""))
    assert bitserial_problem(conv, enabled=True, max_bits=4, module=accept) is None
    assert "bitserial_max_bits=1" in bitserial_problem(conv, enabled=True, max_bits=1, module=accept)
    decline = SimpleNamespace(bitserial_supported=lambda layer: (False, "no thanks"))
    assert "no thanks" in bitserial_problem(conv, enabled=True, max_bits=4, module=decline)
    assert dot_problem(conv) is None
    grouped = _layers(bits=2, groups=2)["conv"]
    assert "groups=2" in dot_problem(grouped)
    if bitserial_module() is not None:
        assert "groups" in bitserial_problem(grouped, enabled=True, max_bits=4, module=bitserial_module())


def _plan(kind: str) -> KernelPlan:
    return KernelPlan(kind, "test", "v0", lambda: (None, None))


def test_choose_kernel_takes_the_cheapest_and_explains() -> None:
    plans = {k: _plan(k) for k in ("bitserial", "dot", "direct")}
    costs = {"bitserial": 30.0, "dot": 10.0, "direct": 20.0}
    choice = choose_kernel("conv", plans, {}, "auto", lambda p: costs[p.kind], "measure")
    assert choice.kind == "dot" and choice.costs_us == costs
    assert choice.reason.startswith("cheapest by measure: dot 10 us, direct 20 us, bitserial 30 us")


def test_choose_kernel_prunes_what_the_model_rules_out() -> None:
    plans = {k: _plan(k) for k in ("bitserial", "dot", "direct")}
    timed: list[str] = []
    model = {"bitserial": 1000.0, "dot": 10.0, "direct": 20.0}

    def measure(plan: KernelPlan) -> float:
        timed.append(plan.kind)
        return model[plan.kind]

    declined: dict[str, str] = {}
    choice = choose_kernel("conv", plans, declined, "auto", measure, "measure", lambda p: model[p.kind])
    assert choice.kind == "dot" and timed == ["dot", "direct"]
    assert "not timed" in declined["bitserial"] and "no bitserial" in choice.reason


def test_forced_kernel_and_its_errors() -> None:
    plans = {k: _plan(k) for k in ("dot", "direct")}
    choice = choose_kernel("layer1.conv", plans, {}, "direct", lambda p: 1.0 / 0, "measure")
    assert choice.kind == "direct" and "forced" in choice.reason  # forced: nothing is timed
    with pytest.raises(fxquant.BackendError, match=r"layer layer1.conv: kernel='bitserial' .*groups=4"):
        choose_kernel("layer1.conv", plans, {"bitserial": "groups=4"}, "bitserial", lambda p: 1.0, "measure")
    assert forced_kernel("dot", "a.b") == "dot"
    table = {"layer4.0.conv1": "direct", "layer4.*": "dot"}
    assert forced_kernel(table, "layer4.0.conv1") == "direct"
    assert forced_kernel(table, "layer4.1.conv2") == "dot"
    assert forced_kernel(table, "layer3.0.conv1") == "auto"


def test_a_kernel_that_disagrees_with_the_reference_is_not_used() -> None:
    plans = {k: _plan(k) for k in ("dot", "direct")}

    def measure(plan: KernelPlan) -> float:
        if plan.kind == "dot":
            raise KernelMismatch("dot (test) accumulator differs from the integer reference")
        return 5.0

    with pytest.warns(RuntimeWarning, match="layer conv: dot .* differs"):
        choice = choose_kernel("conv", plans, {}, "auto", measure, "measure")
    assert choice.kind == "direct" and "no dot: dot (test) accumulator differs" in choice.reason


def test_only_a_missing_kernel_module_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def missing_kernel(name: str, *args):
        if name == BITSERIAL_MODULE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=BITSERIAL_MODULE)
        return real(name, *args)

    monkeypatch.setattr(selection.importlib, "import_module", missing_kernel)
    assert bitserial_module() is None

    def broken_dependency(name: str, *args):
        if name == BITSERIAL_MODULE:
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real(name, *args)

    monkeypatch.setattr(selection.importlib, "import_module", broken_dependency)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        bitserial_module()


def test_excluded_layers_stay_float_and_are_reported() -> None:
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2, exclude=("b2", "head"))
    ref = fxquant.convert(q, backend="torch")
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True)
    layers = {e["name"]: e for e in mod.manifest["layers"]}
    assert layers["b2"]["kernel"] == "float" and layers["head"]["kernel"] == "float"
    assert re.search(r"head\s+Linear\s+32/32\s+float", mod.report())
    assert_matches_reference(mod, ref, x)
