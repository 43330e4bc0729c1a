import itertools

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxquant
from fxquant.errors import ConfigError
from fxquant.passes.analysis.cost_model import (
    COST_META,
    avg_weight_bits,
    bitops,
    expected_bits,
    layer_costs,
    plan_cost,
    size_bytes,
)
from fxquant.passes.fold_bn import fuse_bn_for_qat
from fxquant.passes.trace import trace
from tests.conftest import calibrate_bn


class SmallNet(nn.Module):
    """conv 1->4 (3x3, pad 1, BN) on 8x8 -> conv 4->8 (3x3, stride 2, bias) -> linear 128->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


# Hand-computed, per sample: MACs = output elements x (C_in/groups) x k_h x k_w  (linear: outputs x inputs)
MACS = {"conv1": 4 * 8 * 8 * 1 * 9, "conv2": 8 * 4 * 4 * 4 * 9, "fc": 10 * 128}  # 2304, 4608, 1280
PARAMS = {"conv1": 4 * 1 * 9, "conv2": 8 * 4 * 9, "fc": 10 * 128}  # 36, 288, 1280
# float32 per-channel scales + bias per output channel (BN folded for conv1) + input step and offset
OVERHEAD = {"conv1": 4 * (4 + 4 + 2), "conv2": 4 * (8 + 8 + 2), "fc": 4 * (10 + 10 + 2)}  # 40, 72, 88


def _prepared(**config):
    model = calibrate_bn(SmallNet(), (4, 1, 8, 8))
    return fxquant.prepare(model, (torch.randn(3, 1, 8, 8),), fxquant.QuantConfig(**config))


def test_layer_costs_match_hand_computed_macs_params_and_overhead():
    gm = _prepared()
    costs = layer_costs(gm)
    assert list(costs) == ["conv1", "conv2", "fc"]
    assert {n: c.macs for n, c in costs.items()} == MACS
    assert {n: c.params for n, c in costs.items()} == PARAMS
    assert {n: c.overhead_bytes for n, c in costs.items()} == OVERHEAD
    recorded = {n.target: n.meta[COST_META] for n in gm.graph.nodes if COST_META in n.meta}
    assert recorded == costs


def test_bitops_size_and_average_bits_of_a_mixed_plan():
    costs = layer_costs(_prepared())
    w = {"conv1": 8, "conv2": 3, "fc": 8}
    a = {"conv1": 8, "conv2": 4, "fc": 8}
    assert bitops(costs, w, a) == 2304 * 8 * 8 + 4608 * 3 * 4 + 1280 * 8 * 8 == 284672
    assert size_bytes(costs, w) == 36 + 40 + 288 * 3 / 8 + 72 + 1280 + 88 == 1624
    assert avg_weight_bits(costs, w) == pytest.approx((36 * 8 + 288 * 3 + 1280 * 8) / (36 + 288 + 1280))
    assert plan_cost(costs, "bitops", w, a) == bitops(costs, w, a)
    with pytest.raises(ConfigError, match="unknown cost metric"):
        plan_cost(costs, "latency", w, a)


def test_per_tensor_scales_and_grouped_convs():
    gm = _prepared(per_channel=False)
    assert layer_costs(gm)["conv1"].overhead_bytes == 4 * (1 + 4 + 2)

    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)

        def forward(self, x):
            return self.dw(x)

    dw = fxquant.prepare(Depthwise(), (torch.randn(2, 6, 5, 5),), fxquant.QuantConfig(first_last_bits=None))
    assert layer_costs(dw)["dw"].macs == 6 * 5 * 5 * (6 // 3) * 9


def test_traced_graph_with_shapes_gives_the_same_macs():
    model = calibrate_bn(SmallNet(), (4, 1, 8, 8))
    gm = fuse_bn_for_qat(trace(model))
    ShapeProp(gm).propagate(torch.randn(5, 1, 8, 8))
    assert {n: c.macs for n, c in layer_costs(gm).items()} == MACS


def test_missing_shapes_are_an_error_that_says_what_to_do():
    gm = fxquant.prepare(calibrate_bn(SmallNet(), (4, 1, 8, 8)))
    with pytest.raises(ConfigError, match="example_inputs"):
        layer_costs(gm)


def test_expected_cost_is_the_exact_expectation_and_differentiable():
    costs = layer_costs(_prepared())
    p_w = torch.tensor(0.3, requires_grad=True)  # conv2 weights: 3 bits w.p. 0.3, else 2
    p_a = torch.tensor(0.8, requires_grad=True)  # conv2 inputs: 4 bits w.p. 0.8, else 3
    w = {"conv1": 8.0, "conv2": expected_bits(3, p_w), "fc": 8.0}
    a = {"conv1": 8.0, "conv2": expected_bits(4, p_a), "fc": 8.0}
    expected = bitops(costs, w, a)
    enumerated = 0.0
    for (wb, pw), (ab, pa) in itertools.product(((3, 0.3), (2, 0.7)), ((4, 0.8), (3, 0.2))):
        enumerated += pw * pa * bitops(costs, {"conv1": 8, "conv2": wb, "fc": 8}, {"conv1": 8, "conv2": ab, "fc": 8})
    assert float(expected.detach()) == pytest.approx(enumerated, rel=1e-6)
    expected.backward()
    assert float(p_w.grad) == pytest.approx(4608 * (3 + 0.8), rel=1e-6)  # MACs x E[a_bits]
    assert float(p_a.grad) == pytest.approx(4608 * (2 + 0.3), rel=1e-6)
    avg = avg_weight_bits(costs, w)
    assert float(torch.autograd.grad(avg, p_w)[0]) == pytest.approx(288 / (36 + 288 + 1280))
