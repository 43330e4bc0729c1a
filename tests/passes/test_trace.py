import pytest
import torch
from torch import nn

from fxquant import QuantConfig, TracingError, prepare
from fxquant.passes import trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value
            return self.conv(x)
        return -self.conv(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_untraceable_model_names_module_and_line():
    with pytest.raises(TracingError) as info:
        trace(DataDependent())
    message = str(info.value)
    assert "cannot trace DataDependent" in message
    assert "test_trace.py" in message and "if x.sum() > 0:" in message
    assert "leaf_modules" in message


def test_prepare_reports_tracing_error():
    with pytest.raises(TracingError, match="if x.sum"):
        prepare(Wrapper(), config=QuantConfig())


def test_leaf_module_makes_it_traceable_and_stays_float():
    model = Wrapper().eval()
    x = torch.randn(2, 3, 8, 8)
    q = prepare(model, (x,), QuantConfig(leaf_modules=("body",), first_last_bits=None))
    targets = [n.target for n in q.graph.nodes if n.op == "call_module"]
    assert targets == ["body", "head.input_quant", "head"]
    assert type(q.get_submodule("body")) is DataDependent


def test_unknown_leaf_module():
    with pytest.raises(TracingError, match=r"leaf_modules \['nope'\] are not submodules of Wrapper"):
        trace(Wrapper(), leaf_modules=("nope",))


def test_not_a_module():
    with pytest.raises(TracingError, match="expected a torch.nn.Module"):
        trace(lambda x: x)  # type: ignore[arg-type]
