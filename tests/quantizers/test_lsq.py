"""LSQ (Esser et al., ICLR 2020): forward Eq. 1-2, step gradient Eq. 3, gradient scale, init, levels, freeze."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant.quantizers.lsq import LSQQuantizer, grad_scale, lsq_quantize
from tests.quantizers._common import (
    assert_frozen_matches_prepared,
    assert_unknown_option_rejected,
    prepare_and_train,
    reference_round,
)

X = torch.tensor([-9.0, -4.3, -2.26, -1.1, -0.2, 0.0, 0.3, 0.74, 1.6, 2.45, 3.9, 7.0, 12.0])


def _paper_forward(x: float, s: float, qn: int, qp: int) -> float:
    """x̂ = round(clip(x/s, −Q_N, Q_P))·s (Eq. 1-2), element by element."""
    v = min(max(x / s, -qn), qp)
    return reference_round(v) * s


def _paper_step_grad(x: float, s: float, qn: int, qp: int) -> float:
    """∂x̂/∂s (Eq. 3)."""
    v = x / s
    if v <= -qn:
        return -float(qn)
    if v >= qp:
        return float(qp)
    return -v + reference_round(v)


@pytest.mark.parametrize("qn,qp", [(4, 3), (0, 15), (2, 1), (128, 127)])
def test_forward_matches_eq_1_2(qn, qp):
    s = torch.tensor(0.7)
    out = lsq_quantize(X, s, qn, qp)
    expected = torch.tensor([_paper_forward(float(v), 0.7, qn, qp) for v in X])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qn,qp", [(4, 3), (0, 7)])
def test_gradients_match_eq_3(qn, qp):
    x = X.double().clone().requires_grad_(True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    lsq_quantize(x, s, qn, qp).sum().backward()
    expected_s = sum(_paper_step_grad(float(v), 0.7, qn, qp) for v in X.double())
    assert math.isclose(float(s.grad), expected_s, rel_tol=1e-9, abs_tol=1e-9)
    inside = ((X / 0.7) > -qn) & ((X / 0.7) < qp)
    torch.testing.assert_close(x.grad, inside.double())


def test_gradient_scale_multiplies_only_the_gradient():
    s = torch.tensor(2.0, requires_grad=True)
    y = grad_scale(s, 0.125)
    assert float(y.detach()) == 2.0
    (3.0 * y).backward()
    assert float(s.grad) == pytest.approx(0.375)


def test_quantizer_step_gradient_is_scaled_by_one_over_sqrt_n_qp():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    q = LSQQuantizer(3, "weight", channels=6).double()
    q(w)  # initialises
    q.train()
    out = q(w)
    out.sum().backward()
    qn, qp = 4, 3
    s = q.step.detach()
    n = w[0].numel()
    for c in range(6):
        expected = sum(_paper_step_grad(float(v), float(s[c]), qn, qp) for v in w[c].reshape(-1))
        assert float(q.step.grad[c]) == pytest.approx(expected / math.sqrt(n * qp), rel=1e-9, abs=1e-12)
    assert q.gradient_scale(w) == pytest.approx(1 / math.sqrt(n * qp))


def test_activation_gradient_scale_counts_features_per_example():
    x = torch.rand(5, 3, 4, 4)
    q = LSQQuantizer(4, "activation")
    q(x)
    assert q.gradient_scale(x) == pytest.approx(1 / math.sqrt(48 * 15))
    assert LSQQuantizer(4, "activation", options={"grad_scale": False}).gradient_scale(x) == 1.0


def test_initial_step_is_two_mean_abs_over_sqrt_qp():
    w = torch.randn(4, 8)
    q = LSQQuantizer(4, "weight", channels=4)
    q(w)
    torch.testing.assert_close(q.step.detach(), 2 * w.abs().mean(dim=1) / math.sqrt(7))
    a = torch.rand(16, 10) * 3
    qa = LSQQuantizer(2, "activation")
    qa(a)
    torch.testing.assert_close(qa.step.detach(), 2 * a.abs().mean() / math.sqrt(3))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_levels_are_the_signed_grid(bits):
    q = LSQQuantizer(bits, "weight")
    q(torch.randn(32))
    grid = q.grid()
    assert grid.encoding == "signed"
    codes = torch.arange(2**bits, dtype=torch.float32)
    levels = grid.dequantize(codes) / q.step.detach()
    torch.testing.assert_close(levels, torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)).float(), rtol=1e-6, atol=1e-5)
    assert (levels.abs() < 1e-6).sum() == 1  # zero is a level


def test_one_bit_weights_are_plus_minus_step():
    w = torch.randn(3, 10)
    q = LSQQuantizer(1, "weight", channels=3)
    q(w)
    torch.testing.assert_close(q.step.detach(), w.abs().mean(dim=1))  # the L2-optimal binary scale (our design)
    grid = q.grid()
    assert grid.encoding == "bipolar"
    q.eval()
    out = q(w)
    torch.testing.assert_close(out, torch.where(w >= 0, 1.0, -1.0) * q.step.detach()[:, None])
    q.train()
    torch.testing.assert_close(q(w), out)


def test_activation_levels_unsigned_or_signed_from_the_first_batch():
    q = LSQQuantizer(3, "activation")
    q(torch.rand(64) * 4)
    assert q.grid().encoding == "unsigned" and q.bounds() == (0, 7)
    levels = q.grid().dequantize(torch.arange(8.0)) / q.step.detach()
    torch.testing.assert_close(levels, torch.arange(8.0), rtol=0, atol=1e-5)
    qs = LSQQuantizer(3, "activation")
    qs(torch.randn(64))
    assert qs.grid().encoding == "signed" and qs.bounds() == (4, 3)


@pytest.mark.parametrize("role,channels", [("weight", 5), ("weight", None), ("activation", None)])
def test_training_forward_equals_hard_forward(role, channels):
    x = torch.randn(5, 40) * 2
    q = LSQQuantizer(3, role, channels=channels)
    q(x)
    q.train()
    soft = q(x)
    q.eval()
    hard = q(x)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-5)
    step = q.view(q.step.detach(), x)
    codes = q.codes(x)
    low = q.view(q.grid().low, x)
    torch.testing.assert_close(hard, low + step * codes, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "lsq", bits)
    layers = assert_frozen_matches_prepared(q, x)
    assert layers["conv2"].weight_encoding == "signed"
    assert int(layers["conv2"].weight_int.min()) >= -(2 ** (bits - 1))
    assert int(layers["conv2"].weight_int.max()) <= 2 ** (bits - 1) - 1


def test_config_errors():
    assert_unknown_option_rejected("lsq", {"grad_scale", "binary_scale"})
    cfg = fxquant.QuantConfig(quantizer="lsq", quantizer_options={"grad_scale": False})
    assert cfg.quantizer_options == {"grad_scale": False}
