import torch
from torch import nn

import fxquant
from fxquant import LayerOverride, QuantConfig
from fxquant.layers import QuantLayer
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.dsq import DSQQuantizer


def _call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_every_layer_gets_an_input_quant_node_in_front(tiny_net):
    q = fxquant.prepare(tiny_net, (torch.randn(2, 3, 12, 12),), QuantConfig())
    targets = _call_targets(q)
    layers = fxquant.quantized_layer_names(q)
    assert layers == ["conv1", "conv2", "dw", "fc"]
    for name in layers:
        i = targets.index(name)
        assert targets[i - 1] == f"{name}.input_quant"
    quant_nodes = [t for t in targets if t.endswith(".input_quant")]
    assert len(quant_nodes) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) and "bn" not in n for n, m in q.named_modules())
    q.graph.lint()
    assert [n.name for n in q.graph.nodes if n.op == "placeholder"] == ["x"]


def test_first_last_bits_and_overrides(tiny_net):
    cfg = QuantConfig(weight_bits=2, act_bits=3, overrides={"dw": LayerOverride(weight_bits=5, per_channel=False)})
    q = fxquant.prepare(tiny_net, config=cfg)
    bits = {n: (m.weight_quant.bits, m.input_quant.bits) for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    assert bits == {"conv1": (8, 8), "conv2": (2, 3), "dw": (5, 3), "fc": (8, 8)}
    assert q.get_submodule("conv2").weight_quant.channels == 8
    assert q.get_submodule("dw").weight_quant.channels is None
    spec = {n.target: n.meta["fxquant.spec"] for n in q.graph.nodes if "fxquant.spec" in n.meta}
    assert spec["conv2"] == {"weight_bits": 2, "act_bits": 3, "quantizer": "dsq", "per_channel": True}


def test_excluded_layers_stay_float(tiny_net):
    q = fxquant.prepare(tiny_net, config=QuantConfig(exclude=("fc", "dw")))
    assert fxquant.quantized_layer_names(q) == ["conv1", "conv2"]
    assert type(q.get_submodule("fc")) is nn.Linear


def test_bn_is_attached_for_qat_and_folded_for_inference_mode(tiny_net):
    q = fxquant.prepare(tiny_net, config=QuantConfig())
    assert isinstance(q.get_submodule("conv1").bn, nn.BatchNorm2d)
    q2 = fxquant.prepare(tiny_net, config=QuantConfig(fold_bn="inference"))
    assert q2.get_submodule("conv1").bn is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q2.modules())


def test_prepare_does_not_touch_the_user_model(tiny_net):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    q = fxquant.prepare(tiny_net, (torch.randn(2, 3, 12, 12),))
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(torch.randn(4, 3, 12, 12)).sum().backward()
    opt.step()
    for k, v in tiny_net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_quantizers_have_parameters_before_the_first_forward(tiny_net):
    q = fxquant.prepare(tiny_net)  # no example inputs: initialisation waits for data
    quantizers = fxquant.quantizers_of(q)
    assert len(quantizers) == 8 and all(isinstance(v, Quantizer) for v in quantizers.values())
    assert not any(bool(v.initialized) for v in quantizers.values())
    opt = torch.optim.SGD(q.parameters(), lr=0.01)  # the optimizer can be built now
    q.train()
    q(torch.randn(4, 3, 12, 12)).sum().backward()
    opt.step()
    assert all(bool(v.initialized) for v in quantizers.values())
    assert q.get_submodule("conv2.weight_quant").upper.grad is not None


def test_qat_bn_follows_batch_statistics_and_eval_is_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    q = fxquant.prepare(model, (torch.randn(4, 3, 8, 8),), QuantConfig(first_last_bits=None, weight_bits=8, act_bits=8))
    layer = q.get_submodule("0")
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    mean_before = layer.bn.running_mean.clone()
    q.train()
    y = q(x)
    # training output is normalised with batch statistics: per-channel mean ~ beta (0), var ~ 1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    assert not torch.equal(mean_before, layer.bn.running_mean)
    q.eval()
    weight, bias = layer.folded_weight_bias()
    xq = layer.input_quant(x)
    expected = nn.functional.conv2d(xq, layer.weight_quant(weight), bias)
    torch.testing.assert_close(q(x), expected, atol=1e-4, rtol=1e-4)


def test_dsq_weight_quantizer_is_symmetric_bipolar(tiny_net):
    q = fxquant.prepare(tiny_net, (torch.randn(2, 3, 12, 12),), QuantConfig(weight_bits=2))
    wq = q.get_submodule("conv2.weight_quant")
    assert isinstance(wq, DSQQuantizer)
    grid = wq.grid()
    assert grid.encoding == "bipolar"
    torch.testing.assert_close(grid.low, -3 * grid.scale)  # levels -3s, -s, s, 3s


def test_freeze_bn_stats_folds_running_statistics_in_training():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    q = fxquant.prepare(model, (torch.randn(4, 3, 8, 8),), QuantConfig(first_last_bits=None))
    layer = q.get_submodule("0")
    fxquant.freeze_bn_stats(q)
    q.train()
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    mean_before = layer.bn.running_mean.clone()
    y = q(x)
    assert torch.equal(mean_before, layer.bn.running_mean)
    weight, bias = layer.folded_weight_bias()
    expected = nn.functional.conv2d(layer.input_quant(x), layer.weight_quant(weight), bias)
    torch.testing.assert_close(y, expected)
    fxquant.freeze_bn_stats(q, frozen=False)
    q(x)
    assert not torch.equal(mean_before, layer.bn.running_mean)
