"""Backends declare what they lower; ``convert`` checks the frozen graph against the declaration first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends import registry
from fxquant.backends.registry import BackendCapabilities, backend_capabilities, unsupported_nodes
from fxquant.integer import FrozenConv2d


class TwoUnsupported(nn.Module):
    """A conv net with a Softmin module and a logcumsumexp call: torch runs both, TVM lowers neither."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Softmin(dim=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.logcumsumexp(self.act(self.conv(x)), dim=1)
        return self.fc(y.mean((2, 3)))


def _prepared() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    x = torch.randn(2, 3, 6, 6)
    return fxquant.prepare(TwoUnsupported(), (x,), fxquant.QuantConfig(weight_bits=4, act_bits=4)).eval(), x


def test_tvm_llvm_names_every_unsupported_node_before_lowering(monkeypatch) -> None:
    tvm_backend = pytest.importorskip("fxquant.backends.tvm")

    def no_lowering(*args, **kwargs):
        raise AssertionError("lowering started for a graph the backend does not support")

    monkeypatch.setattr(tvm_backend, "_lower_and_compile", no_lowering)
    q, _ = _prepared()
    with pytest.raises(fxquant.UnsupportedOpError) as info:
        fxquant.convert(q, backend="tvm-llvm")
    nodes = info.value.nodes
    assert len(nodes) == 2, nodes
    assert "act (call_module act: torch.nn.modules.activation.Softmin): no converter" in nodes[0]
    assert "(call_function torch.logcumsumexp)" in nodes[1]


def test_torch_backend_accepts_what_it_supports() -> None:
    q, x = _prepared()
    assert backend_capabilities("torch").node_problem is None  # the graph runs as it is
    assert unsupported_nodes(backend_capabilities("torch"), fxquant.passes.freeze(q)) == []
    ref = fxquant.convert(q, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(ref(x), q(x), rtol=0, atol=0)


def test_declared_layer_kinds_and_bits_are_checked(monkeypatch) -> None:
    lowered = []
    narrow = BackendCapabilities(layer_kinds=(FrozenConv2d,), weight_bits=(1, 2), stage="narrow backend")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    registry.register_backend("narrow", narrow)(lambda frozen, **options: lowered.append(frozen))
    q, _ = _prepared()
    with pytest.raises(fxquant.UnsupportedOpError) as info:
        fxquant.convert(q, backend="narrow")
    assert info.value.stage == "narrow backend"
    assert info.value.nodes == [
        "conv (call_module conv: fxquant.integer.IntegerConv2d): weight_bits=8 outside 1..2",  # first layer: 8 bits
        "fc (call_module fc: fxquant.integer.IntegerLinear): FrozenLinear layers are not supported",
    ]
    assert lowered == []
