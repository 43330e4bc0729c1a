"""DSQ (Gong et al., ICCV 2019): Eq. 3-8 soft function, its gradients, the α → 0 limit, levels, freeze."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant.quantizers.dsq import ALPHA_MAX, ALPHA_MIN, DSQQuantizer, dsq_soft
from fxquant.quantizers.grid import uniform_codes
from tests.quantizers._common import assert_frozen_matches_prepared, assert_unknown_option_rejected, prepare_and_train


def _paper_q_s(x: float, l: float, u: float, bits: int, alpha: float) -> float:
    """Q_S of Eq. 3-5 with s, k from Eq. 6-8, by an explicit search over the intervals P_i."""
    n = 2**bits - 1
    delta = (u - l) / n
    s = 1.0 / (1.0 - alpha)
    k = math.log(2.0 / alpha - 1.0) / delta
    if x < l:
        return l
    if x > u:
        return u
    for i in range(n):
        lo, hi = l + i * delta, l + (i + 1) * delta
        if lo <= x <= hi:
            m = l + (i + 0.5) * delta
            phi = s * math.tanh(k * (x - m))
            return l + delta * (i + (phi + 1.0) / 2.0)
    raise AssertionError(x)


def _off_edges(x: torch.Tensor, l: float, u: float, bits: int, margin: float = 0.02) -> torch.Tensor:
    delta = (u - l) / (2**bits - 1)
    frac = (x - l) / delta - torch.floor((x - l) / delta)
    return x[(frac > margin) & (frac < 1 - margin) & ((frac - 0.5).abs() > margin)]


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.45])
def test_soft_function_matches_eq_3_to_8(bits, alpha):
    x = torch.linspace(-1.7, 2.4, 83, dtype=torch.float64)
    l, u = -0.9, 1.6
    step = (u - l) / (2**bits - 1)
    out = dsq_soft(x, torch.tensor(l, dtype=torch.float64), torch.tensor(step, dtype=torch.float64), bits,
                   torch.tensor(alpha, dtype=torch.float64))
    expected = torch.tensor([_paper_q_s(float(v), l, u, bits, alpha) for v in x], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_characteristic_variable_eq_6_to_8():
    q = DSQQuantizer(2, "weight", options={"alpha": 0.3})
    alpha, k_delta = q.characteristic()
    assert alpha == pytest.approx(0.3)
    assert 1.0 - math.tanh(0.5 * k_delta) == pytest.approx(alpha)  # α = 1 − tanh(0.5kΔ)


def test_gradcheck_soft_function_x_low_step_alpha():
    bits, l, u = 2, -0.9, 1.6
    x = _off_edges(torch.linspace(-0.85, 1.55, 40, dtype=torch.float64), l, u, bits, margin=0.05)
    x = x.clone().requires_grad_(True)
    low = torch.tensor(l, dtype=torch.float64, requires_grad=True)
    step = torch.tensor((u - l) / 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dsq_soft(a[0], a[1], a[2], bits, a[3]), (x, low, step, alpha))


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_training_gradient_is_the_soft_functions_and_value_is_hard(role):
    """Algorithm 1: forward sgn φ (the staircase), backward ∂Q_S (fused implementation vs autograd of Q_S)."""
    x = torch.randn(3, 50, dtype=torch.float64) * (1.0 if role == "weight" else 2.0)
    q = DSQQuantizer(3, role, channels=3 if role == "weight" else None).double()
    q(x)  # initialise
    if role == "activation":
        with torch.no_grad():
            q.lower.fill_(-0.5)
            q.signed.fill_(True)
    q.train()
    xa = x.clone().requires_grad_(True)
    out = q.soft_forward(xa)
    weights = torch.linspace(0.3, 1.7, x.numel(), dtype=torch.float64).reshape(x.shape)
    (out * weights).sum().backward()
    fused = {n: p.grad.clone() for n, p in q.named_parameters()}
    fused_x = xa.grad.clone()
    q.zero_grad()
    xb = x.clone().requires_grad_(True)
    (q.soft_function(xb) * weights).sum().backward()
    for name, p in q.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(fused_x, xb.grad)
    q.eval()
    assert torch.equal(out.detach(), q(x))


def test_alpha_to_zero_is_the_hard_quantizer():
    bits, l, u = 2, -1.0, 1.0
    x = _off_edges(torch.linspace(-1.4, 1.4, 301, dtype=torch.float64), l, u, bits)
    q = DSQQuantizer(bits, "weight").double()
    with torch.no_grad():
        q.upper.fill_(u)
    q.initialized.fill_(True)
    codes = q.codes(x)
    hard = q.hard_forward(x).detach()
    low, step = q.grid().low.detach(), q.grid().step.detach()
    deviations = []
    for alpha in (0.4, 0.2, 0.05, 0.01, ALPHA_MIN):
        soft = dsq_soft(x, low, step, bits, torch.tensor(alpha, dtype=torch.float64))
        assert torch.equal(uniform_codes(soft, low, step, bits), codes)  # sgn φ decides like rounding
        deviations.append(float((soft - hard).abs().max()))
    assert all(a > b for a, b in zip(deviations, deviations[1:], strict=False))
    # the paper's Q_S itself (no lower bound on α) reaches the staircase exactly away from the ties
    limit = torch.tensor([_paper_q_s(float(v), l, u, bits, 1e-300) for v in x], dtype=torch.float64)
    torch.testing.assert_close(limit, hard, rtol=0, atol=1e-9)
    assert ALPHA_MIN < 0.01 < ALPHA_MAX


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_levels(bits):
    w = torch.randn(4, 20)
    q = DSQQuantizer(bits, "weight", channels=4)
    q(w)
    n = 2**bits - 1
    grid = q.grid()
    levels = grid.dequantize(torch.arange(n + 1.0).expand(4, -1).contiguous())
    # 1-bit weights are ±mean|w| per channel (option binary_scale="mean"), other widths span the learned clip
    u = w.abs().mean(1, keepdim=True) if bits == 1 else q.upper.detach()[:, None]
    torch.testing.assert_close(levels[:, 0:1], -u)
    torch.testing.assert_close(levels[:, -1:], u)  # l and u are both levels
    torch.testing.assert_close(levels, -levels.flip(1))  # symmetric, bipolar
    assert not (levels.abs() < 1e-7).any() and grid.encoding == "bipolar"
    a = DSQQuantizer(bits, "activation")
    a(torch.rand(100) * 3)
    agrid = a.grid()
    alevels = agrid.dequantize(torch.arange(n + 1.0))
    assert agrid.encoding == "unsigned" and float(alevels[0].detach()) == 0.0
    torch.testing.assert_close(alevels[-1], a.upper.detach())
    torch.testing.assert_close(alevels[1:] - alevels[:-1], agrid.step.expand(n))


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "dsq", bits)
    layers = assert_frozen_matches_prepared(q, x)
    n = 2**bits - 1
    assert set(layers["conv2"].weight_int.unique().tolist()) <= set(range(-n, n + 1, 2))


def test_config_errors():
    assert_unknown_option_rejected("dsq", {"alpha", "learn_alpha", "binary_scale"})
    with pytest.raises(fxquant.ConfigError, match="alpha"):
        DSQQuantizer(2, "weight", options={"alpha": 0.7})
