"""STE baseline: min/max-calibrated uniform grid, straight-through gradient, EMA ranges, freeze."""

from __future__ import annotations

import pytest
import torch

from fxquant.quantizers.ste import STEQuantizer
from tests.quantizers._common import (
    assert_frozen_matches_prepared,
    assert_unknown_option_rejected,
    prepare_and_train,
    reference_round,
)


def test_weight_forward_is_round_to_nearest_on_the_max_abs_grid():
    w = torch.randn(3, 17)
    q = STEQuantizer(2, "weight", channels=3)
    q(w)
    q.eval()
    out = q(w)
    for c in range(3):
        m = float(w[c].abs().max())
        step = 2 * m / 3
        for v, o in zip(w[c].tolist(), out[c].tolist(), strict=True):
            code = min(max(reference_round((v + m) / step), 0), 3)
            assert o == pytest.approx(-m + step * code, abs=1e-6)


def test_gradient_is_straight_through_inside_and_zero_outside():
    q = STEQuantizer(3, "activation", options={"momentum": 0.0})
    q(torch.tensor([0.0, 2.0]))  # range [0, 2]
    q.train()
    x = torch.tensor([-0.5, 0.1, 0.9, 1.99, 2.5], requires_grad=True)
    out = q(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    q.eval()
    assert torch.equal(out.detach(), q(x.detach()))


def test_activation_range_is_an_exponential_moving_average():
    q = STEQuantizer(4, "activation", options={"momentum": 0.25})
    q(torch.tensor([0.0, 4.0]))
    q.train()
    q(torch.tensor([0.0, 8.0]))
    assert float(q.high) == pytest.approx(4.0 + 0.25 * (8.0 - 4.0))
    assert float(q.low) == 0.0


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_levels(bits):
    w = torch.randn(2, 9)
    q = STEQuantizer(bits, "weight", channels=2)
    q(w)
    n = 2**bits - 1
    levels = q.grid().dequantize(torch.arange(n + 1.0).expand(2, -1).contiguous())
    assert q.grid().encoding == "bipolar"
    torch.testing.assert_close(levels, -levels.flip(1))
    torch.testing.assert_close(levels[:, -1], w.abs().amax(dim=1))
    a = STEQuantizer(bits, "activation")
    a(torch.rand(50))
    assert a.grid().encoding == "unsigned" and float(a.grid().dequantize(torch.zeros(1))) == 0.0


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "ste", bits)
    assert_frozen_matches_prepared(q, x)


def test_config_errors():
    assert_unknown_option_rejected("ste", {"momentum"})
