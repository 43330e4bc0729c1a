import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import fxquant
from fxquant import FxQuantError, QuantConfig
from fxquant.integer import (
    FrozenConv2d,
    FrozenLinear,
    IntegerConv2d,
    IntegerLayer,
    IntegerLinear,
    integer_module,
    integer_output,
)
from fxquant.layers import QuantLayer
from fxquant.passes import freeze
from fxquant.passes.freeze import frozen_layers
from fxquant.passes.rewrite import replace_submodule
from fxquant.quantizers.base import Quantizer


def _prepared(model, bits=3):
    x = torch.randn(4, 3, 12, 12)
    return fxquant.prepare(model, (x,), QuantConfig(weight_bits=bits, act_bits=bits)).eval(), x


def _numpy_conv_int(codes: np.ndarray, weight: np.ndarray, stride, padding, groups) -> np.ndarray:
    """Direct integer convolution in int64 (independent of PyTorch's conv)."""
    n, c, h, w = codes.shape
    o, cg, kh, kw = weight.shape
    padded = np.pad(codes, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for i in range(oh):
            for j in range(ow):
                top, left = i * stride[0], j * stride[1]
                window = padded[:, g * cg:(g + 1) * cg, top:top + kh, left:left + kw]
                out[:, oc, i, j] = (window.astype(np.int64) * weight[oc].astype(np.int64)).sum(axis=(1, 2, 3))
    return out


def test_freeze_replaces_every_quant_pair_with_an_integer_layer(tiny_net):
    q, x = _prepared(tiny_net)
    frozen = freeze(q)
    assert not any(isinstance(m, (QuantLayer, Quantizer)) for m in frozen.modules())
    kinds = {n: type(m) for n, m in frozen.named_modules() if isinstance(m, IntegerLayer)}
    assert kinds == {"conv1": IntegerConv2d, "conv2": IntegerConv2d, "dw": IntegerConv2d, "fc": IntegerLinear}
    assert not any(n.target.endswith("input_quant") for n in frozen.graph.nodes if n.op == "call_module")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, QuantLayer) for m in q.modules())  # the prepared model is untouched
    frozen.graph.lint()


def test_integer_codes_and_weights_are_in_range(tiny_net):
    frozen = freeze(_prepared(tiny_net, bits=2)[0])
    conv2 = frozen.get_submodule("conv2")
    assert conv2.weight_bits == 2 and conv2.weight_encoding == "bipolar"
    assert set(conv2.weight_int.unique().tolist()) <= {-3, -1, 1, 3}
    torch.testing.assert_close(conv2.weight_int, 2 * conv2.weight_codes.int() - 3, rtol=0, atol=0)
    assert conv2.weight_codes.dtype == torch.uint8 and int(conv2.weight_codes.max()) <= 3


def test_accumulators_equal_an_independent_integer_convolution(tiny_net):
    q, x = _prepared(tiny_net)
    frozen = freeze(q)
    inputs = {}
    for name in ("conv2", "dw"):
        frozen.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0]))
    frozen(x)
    for name in ("conv2", "dw"):
        layer = frozen.get_submodule(name)
        codes = layer.input_codes(inputs[name])
        acc = layer.accumulate(codes)
        expected = _numpy_conv_int(
            codes.numpy().astype(np.int64), layer.weight_int.numpy(), layer.stride, layer.padding, layer.groups
        )
        np.testing.assert_array_equal(acc.numpy(), expected)


def test_float32_and_float64_accumulation_agree_exactly():
    torch.manual_seed(1)
    weight_codes = torch.randint(0, 16, (16, 32, 3, 3))
    layer = IntegerConv2d(
        stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
        weight_int=2 * weight_codes - 15, weight_codes=weight_codes, weight_scale=torch.full((16,), 0.01),
        bias=None, weight_bits=4, weight_encoding="bipolar", act_bits=4,
        input_low=torch.tensor(0.0), input_step=torch.tensor(0.1),
    )
    assert layer.exact_dtype == torch.float32  # 288 * 15 * 15 < 2**24
    codes = torch.randint(0, 16, (2, 32, 9, 9)).float()
    acc64 = nn.functional.conv2d(codes.double(), layer.weight_int.double(), padding=1).long()
    assert torch.equal(layer.accumulate(codes), acc64)
    wide = IntegerConv2d(
        stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
        weight_int=torch.full((1, 512, 3, 3), 255), weight_codes=torch.full((1, 512, 3, 3), 255),
        weight_scale=torch.ones(1), bias=None, weight_bits=8, weight_encoding="unsigned", act_bits=8,
        input_low=torch.tensor(0.0), input_step=torch.tensor(1.0),
    )
    assert wide.exact_dtype == torch.float64
    assert int(wide.accumulate(torch.full((1, 512, 3, 3), 255.0))) == 512 * 9 * 255 * 255


def test_signed_input_grid_uses_the_offset_term():
    """A layer whose input grid starts below zero (no ReLU in front) still computes exactly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)).eval()
    x = torch.randn(2, 3, 6, 6)
    q = fxquant.prepare(model, (x,), QuantConfig(weight_bits=4, act_bits=4, first_last_bits=None)).eval()
    frozen = freeze(q)
    layer = frozen.get_submodule("1")
    assert float(layer.input_low) < 0
    inputs = []
    layer.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    out = frozen(x)
    # the same layer computed in float64 from dequantized values
    codes = layer.input_codes(inputs[0]).double()
    xq = layer.input_low.double() + layer.input_step.double() * codes
    w = layer.weight_int.double() * layer.weight_scale.double().reshape(-1, 1, 1, 1)
    expected = nn.functional.conv2d(xq, w, layer.bias.double(), padding=1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(q(x), out)


def test_freeze_before_any_data_is_an_error(tiny_net):
    q = fxquant.prepare(tiny_net)
    with pytest.raises(FxQuantError, match="have not seen data yet.*conv1"):
        freeze(q)


def test_convert_rejects_a_plain_model(tiny_net):
    with pytest.raises(FxQuantError, match="expects a model returned by fxquant.prepare"):
        fxquant.convert(tiny_net)


def test_unknown_backend_lists_available(tiny_net):
    q, _ = _prepared(tiny_net)
    with pytest.raises(fxquant.BackendError, match=r"backend='tpu' is unknown; available: .*torch"):
        fxquant.convert(q, backend="tpu")


def test_wrong_input_to_converted_model(tiny_net):
    q, x = _prepared(tiny_net)
    ref = fxquant.convert(q)
    with pytest.raises(fxquant.InputError, match="expected float32 input, got torch.float64"):
        ref(x.double())
    with pytest.raises(fxquant.InputError, match=r"expected 3 input channels \(dim 1\), got shape \(4, 5, 12, 12\)"):
        ref(torch.randn(4, 5, 12, 12))


def test_freeze_describes_each_layer_as_data_the_modules_are_built_from(tiny_net):
    q, x = _prepared(tiny_net)
    frozen = freeze(q)
    described = frozen_layers(frozen)
    kinds = {name: type(layer) for name, layer in described.items()}
    assert kinds == {"conv1": FrozenConv2d, "conv2": FrozenConv2d, "dw": FrozenConv2d, "fc": FrozenLinear}
    dw = described["dw"]
    assert (dw.groups, dw.stride, dw.weight_bits, dw.act_bits) == (tiny_net.dw.groups, (1, 1), 3, 3)
    assert not any(isinstance(getattr(dw, f.name), nn.Module) for f in dataclasses.fields(dw))
    with pytest.raises(dataclasses.FrozenInstanceError):
        dw.weight_bits = 2
    # rebuilt from the descriptions alone, the integer graph computes the same numbers bit for bit
    rebuilt = copy.deepcopy(frozen)
    for name, layer in described.items():
        replace_submodule(rebuilt, name, integer_module(layer))
    torch.testing.assert_close(rebuilt(x), frozen(x), rtol=0, atol=0)
    # and the QAT layer's eval forward runs the same arithmetic on the same description
    conv2 = q.get_submodule("conv2")
    codes = torch.randint(0, 8, (2, 8, 6, 6)).float()
    torch.testing.assert_close(integer_output(conv2.freeze("conv2"), codes),
                               frozen.get_submodule("conv2").integer_output(codes), rtol=0, atol=0)
