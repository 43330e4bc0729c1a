"""The five target architectures go through prepare → QAT step → convert("torch") with exact agreement."""

import pytest
import torch
import torchvision

import fxquant
from fxquant import QuantConfig
from fxquant.integer import IntegerLayer
from fxquant.layers import QuantLayer
from fxquant.models import resnet20

from .conftest import calibrate_bn

ARCHITECTURES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64),
    "shufflenet_v2_x1_0": (lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 64),
    "resnet20": (lambda: resnet20(num_classes=10), 32),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_convert_torch_matches_prepared_eval_exactly(name):
    build, size = ARCHITECTURES[name]
    model = calibrate_bn(build(), (8, 3, size, size))
    x = torch.randn(4, 3, size, size)
    q = fxquant.prepare(model, (x,), QuantConfig(quantizer="dsq", weight_bits=4, act_bits=4))

    # one QAT step so that the compared model is a trained one, not the initialisation
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
    torch.nn.functional.cross_entropy(q(x), torch.arange(4) % 10).backward()
    # random-init nets at 4 bits leave channels constant, and batch-norm statistics then amplify
    # gradients; a clipped step is what a QAT loop on such a model does
    torch.nn.utils.clip_grad_norm_(q.parameters(), 1.0)
    opt.step()

    q.eval()
    ref = fxquant.convert(q, backend="torch")
    n_layers = sum(isinstance(m, IntegerLayer) for m in ref.modules())
    assert n_layers == sum(isinstance(m, QuantLayer) for m in q.modules()) > 10

    # per layer, on identical inputs: the same codes
    q_codes, r_codes = {}, {}
    for n, m in q.named_modules():
        if isinstance(m, QuantLayer):
            m.input_quant.register_forward_hook(lambda mod, i, o, n=n: q_codes.__setitem__(n, mod.codes(i[0])))
    for n, m in ref.named_modules():
        if isinstance(m, IntegerLayer):
            m.register_forward_hook(lambda mod, i, o, n=n: r_codes.__setitem__(n, mod.input_codes(i[0])))
    with torch.no_grad():
        y_q, y_r = q(x), ref(x)
    assert q_codes.keys() == r_codes.keys()
    for layer in q_codes:
        assert torch.equal(q_codes[layer], r_codes[layer]), layer
    assert torch.equal(y_q, y_r)
    assert torch.equal(y_q.argmax(1), y_r.argmax(1))

    # the training-time float path computes the same function up to float32 rounding, layer by layer
    mismatch = []
    for n, m in q.named_modules():
        if isinstance(m, QuantLayer):
            inputs = []
            h = m.register_forward_hook(lambda mod, i, o, inputs=inputs: inputs.append(i[0]))
            with torch.no_grad():
                q(x)
            h.remove()
            xq = inputs[0]
            weight, bias = m.folded_weight_bias()
            from fxquant.layers import _apply

            with torch.no_grad():
                y_float = _apply(m.layer, xq, m.weight_quant.hard_forward(weight), bias)
                y_int = m.integer_forward(xq)
            scale = y_int.abs().max().clamp_min(1e-6)
            if not torch.allclose(y_float, y_int, atol=1e-4 * float(scale), rtol=1e-4):
                mismatch.append(n)
    assert mismatch == []
