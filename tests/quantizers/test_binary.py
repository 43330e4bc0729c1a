"""1-bit weights under QAT batch-norm folding: the quantized weight must follow the fold factor.

A QAT layer quantizes ``w·γ/σ_running`` and divides its output by ``γ/σ_running`` again before the batch
norm. If the 1-bit weight were ``±s`` with a fixed learned ``s``, that output would scale with
``σ_running``; the running variance then never settles (each update multiplies it by a factor), eval folds
statistics that training never used, and a W1A1 model that trains well collapses in eval (issue 17: DSQ
14.5 % test accuracy at a training loss of 0.93).
"""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import ConfigError
from fxquant.layers import QuantLayer
from fxquant.quantizers.dsq import DSQQuantizer
from fxquant.quantizers.lsq import LSQQuantizer
from tests.quantizers._common import assert_frozen_matches_prepared, prepare_and_train


def _bn_input(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """What the layer's batch norm receives in a training forward (its statistics left as they are)."""
    seen = []
    hook = layer.bn.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    momentum, layer.bn.momentum = layer.bn.momentum, 0.0
    try:
        with torch.no_grad():
            layer.train()(x)
    finally:
        hook.remove()
        layer.bn.momentum = momentum
    return seen[0]


@pytest.mark.parametrize("scheme", ["dsq", "lsq", "lcq", "ste"])
def test_one_bit_layer_output_ignores_running_variance(tiny_net, scheme):
    """Regression (issue 17): the batch norm's input must not depend on the running variance at 1 bit."""
    x = torch.randn(8, 3, 12, 12)
    q = fxquant.prepare(tiny_net, (x,), fxquant.QuantConfig(quantizer=scheme, weight_bits=1, act_bits=1,
                                                             first_last_bits=None))
    q.train()(x)  # data-dependent initialisation
    layer = q.get_submodule("conv2")
    assert isinstance(layer, QuantLayer) and layer.weight_quant.bits == 1
    features = torch.relu(torch.randn(8, 8, 12, 12))
    before = _bn_input(layer, features)
    layer.bn.running_var.mul_(torch.linspace(0.25, 4.0, 8))  # as if the statistics had drifted
    torch.testing.assert_close(_bn_input(layer, features), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer", [DSQQuantizer, LSQQuantizer])
def test_binary_weight_is_mean_abs_times_sign(quantizer):
    w = torch.randn(4, 3, 3, 3)
    w[0, 0, 0, 0] = 0.0  # sgn(0) = +1, the bipolar code 1
    q = quantizer(1, "weight", channels=4)
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(q.train()(w), expected)
    scale = torch.tensor([2.0, 0.5, 1.0, 3.0]).reshape(4, 1, 1, 1)
    torch.testing.assert_close(q(w * scale), expected * scale)  # follows the per-channel scale of its input
    torch.testing.assert_close(q.eval()(w * scale), expected * scale)
    grid = q.grid()
    assert grid.encoding == "bipolar"
    torch.testing.assert_close(grid.scale, (w * scale).abs().mean((1, 2, 3)))


@pytest.mark.parametrize("quantizer", [DSQQuantizer, LSQQuantizer])
def test_binary_weight_gradient_reaches_every_weight(quantizer):
    """The surrogate's window is max|w| per channel: no latent weight is cut off from its gradient."""
    w = torch.randn(4, 16, requires_grad=True)
    quantizer(1, "weight", channels=4).train()(w).sum().backward()
    assert bool((w.grad != 0).all())


def test_learned_binary_scale_keeps_the_scheme_scale():
    w = torch.randn(4, 16)
    q = DSQQuantizer(1, "weight", channels=4, options={"binary_scale": "learned"})
    out = q.train()(w)
    torch.testing.assert_close(out.abs(), q.upper.detach().abs()[:, None].expand_as(out))


def test_qn_refuses_one_bit_weights_naming_the_layer(tiny_net):
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ConfigError, match="layer 'conv2': quantizer 'qn' cannot quantize weights to 1 bit"):
        fxquant.prepare(tiny_net, (x,), fxquant.QuantConfig(quantizer="qn", weight_bits=1, act_bits=2))


def test_binary_scale_option_is_checked():
    with pytest.raises(ConfigError, match="binary_scale='median'.*allowed: mean, learned"):
        LSQQuantizer(1, "weight", options={"binary_scale": "median"})


@pytest.mark.parametrize("scheme", ["dsq", "lsq"])
def test_one_bit_freeze_equals_prepared_eval(tiny_net, scheme):
    q, x = prepare_and_train(tiny_net, scheme, 1)
    layers = assert_frozen_matches_prepared(q, x)
    assert {name: layer.weight_bits for name, layer in layers.items()} == {"conv1": 8, "conv2": 1, "dw": 1, "fc": 8}
