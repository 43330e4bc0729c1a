"""Quantization Networks (Yang et al., CVPR 2019): soft/hard functions, gradients, k-means biases, schedule."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant.quantizers.qn import CLAMP, QNQuantizer, kmeans_1d, kmeans_thresholds, qn_hard, qn_soft
from tests.quantizers._common import assert_frozen_matches_prepared, assert_unknown_option_rejected, prepare_and_train

BIASES = torch.tensor([-1.5, -0.2, 0.0, 1.2])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _paper_soft(x: float, alpha: float, beta: float, biases: list[float], t: float, s: float, o: float) -> float:
    """α·(Σ_i s·σ(clamp(T(βx − b_i), −10, 10)) − o), one sigmoid at a time."""
    total = 0.0
    for b in biases:
        total += s * _sigmoid(min(max(t * (beta * x - b), -10.0), 10.0))
    return alpha * (total - o)


def _paper_hard(x: float, alpha: float, beta: float, biases: list[float], s: float, o: float) -> float:
    return alpha * (sum(s for b in biases if beta * x - b >= 0) - o)


@pytest.mark.parametrize("t", [0.5, 3.0, 40.0])
@pytest.mark.parametrize("s,o", [(2.0, 4.0), (1.0, 0.0)])
def test_soft_function_matches_the_paper(t, s, o):
    x = torch.linspace(-3, 3, 41)
    out = qn_soft(x, torch.tensor(0.7), torch.tensor(1.3), BIASES, t, s, o)
    expected = [_paper_soft(float(v), 0.7, 1.3, BIASES.tolist(), t, s, o) for v in x]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_hard_function_matches_the_paper():
    x = torch.linspace(-3, 3, 41)
    out = qn_hard(x, torch.tensor(0.7), torch.tensor(1.3), BIASES, 2.0, 4.0)
    expected = [_paper_hard(float(v), 0.7, 1.3, BIASES.tolist(), 2.0, 4.0) for v in x]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


def test_gradcheck_x_alpha_beta_where_smooth():
    x = torch.linspace(-2.5, 2.5, 17, dtype=torch.float64).requires_grad_(True)
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    biases = BIASES.double()
    # |T(βx − b)| stays below the clamp, so the function is smooth here
    assert float((1.5 * (0.9 * x.detach()[:, None] - biases)).abs().max()) < CLAMP

    def f(x, alpha, beta):
        return qn_soft(x, alpha, beta, biases, 1.5, 2.0, 4.0)

    assert torch.autograd.gradcheck(f, (x, alpha, beta))


def test_clamped_region_uses_the_original_backward():
    """Where the sigmoid argument is clamped, ∂y/∂x = α·β·T·Σ s·σ(c)(1 − σ(c)) at the clamped c (original code)."""
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    alpha, beta, t = 0.5, 1.1, 200.0
    y = qn_soft(x, torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), BIASES.double(),
                t, 2.0, 4.0)
    y.sum().backward()
    for xv, g in zip(x.detach().tolist(), x.grad.tolist(), strict=True):
        slope = 0.0
        for b in BIASES.tolist():
            c = min(max(t * (beta * xv - b), -10.0), 10.0)
            slope += 2.0 * _sigmoid(c) * (1.0 - _sigmoid(c))
        assert g == pytest.approx(alpha * beta * t * slope, rel=1e-9)
        assert g > 0


@pytest.mark.parametrize("role,bits", [("weight", 2), ("weight", 3), ("activation", 2), ("activation", 4)])
def test_high_temperature_limit_is_the_hard_quantizer(role, bits):
    x = torch.randn(4, 300) * 1.5 + (0.0 if role == "weight" else 1.0)
    x = x.clamp_min(0) if role == "activation" else x
    q = QNQuantizer(bits, role)
    q(x)
    beta, alpha = float(q.beta.detach()), float(q.alpha.detach())
    t = 1e6
    # away from ties: every βx at least 20/T from every bias
    far = ((beta * x.unsqueeze(-1) - q.biases).abs() * t > 20).all(-1)
    assert int(far.sum()) > 1100
    q.temperature.fill_(t)
    q.train()
    soft = q(x).detach()
    q.eval()
    codes = q.codes(x)
    hard = q(x)
    implied = torch.round((soft / alpha + q.offset) / q.height)
    assert torch.equal(implied[far], codes[far])
    # the clamp at ±10 leaves at most n·s·σ(−10)·α between the two (the original code's own gap)
    bound = q.steps * q.height * _sigmoid(-CLAMP) * alpha * 1.01
    assert float((soft - hard)[far].abs().max()) <= bound
    # and without the clamp the limit is exact
    z = beta * x
    unclamped = alpha * (q.height * torch.sigmoid(t * (z.unsqueeze(-1) - q.biases)).sum(-1) - q.offset)
    torch.testing.assert_close(unclamped[far], hard[far], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_levels_are_odd_integers_times_alpha(bits):
    w = torch.randn(6, 20)
    q = QNQuantizer(bits, "weight", channels=6)
    q(w)
    grid = q.grid()
    assert grid.encoding == "bipolar" and q.uniform
    n = 2**bits - 1
    levels = grid.dequantize(torch.arange(n + 1.0).expand(6, -1).contiguous()) / q.alpha.detach()[:, None]
    odd = torch.arange(-n, n + 1, 2).float()
    torch.testing.assert_close(levels, odd.expand(6, -1), rtol=1e-6, atol=1e-5)
    assert not (levels.abs() < 1e-6).any()  # no zero level
    q.eval()
    out = q(w) / q.alpha.detach()[:, None]
    assert set(torch.round(out).unique().tolist()) <= set(odd.tolist())
    if bits == 1:
        assert set(torch.round(out).unique().tolist()) == {-1.0, 1.0}


def test_weight_init_follows_the_original_code():
    w = torch.randn(3, 50)
    q = QNQuantizer(2, "weight", channels=3, options={"alpha_init": "inverse_beta"})
    q(w)
    torch.testing.assert_close(q.beta.detach(), 1.25 * 3 / w.abs().amax(dim=1))
    torch.testing.assert_close(q.alpha.detach(), 1 / q.beta.detach())
    expected = kmeans_thresholds(w * q.beta.detach()[:, None], 4)
    torch.testing.assert_close(q.biases, expected)
    thresholds = q.grid().thresholds
    assert thresholds.shape == (3, 3)
    torch.testing.assert_close(thresholds, q.biases[None, :] / q.beta.detach()[:, None])


def test_default_alpha_is_the_least_squares_fit_of_the_staircase():
    w = torch.randn(3, 50)
    q = QNQuantizer(2, "weight", channels=3)
    q(w)
    staircase = q.codes(w) * q.height - q.offset
    expected = (w * staircase).sum(1) / (staircase * staircase).sum(1)
    torch.testing.assert_close(q.alpha.detach(), expected)
    # the fit is at least as good as the original's 1/beta in squared error, per channel
    fit = ((w - q.alpha.detach()[:, None] * staircase) ** 2).sum(1)
    inverse = ((w - staircase / q.beta.detach()[:, None]) ** 2).sum(1)
    assert bool((fit <= inverse + 1e-6).all())


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_activation_levels_and_thresholds(bits):
    x = torch.relu(torch.randn(16, 8, 5, 5))
    q = QNQuantizer(bits, "activation")
    q(x)
    grid = q.grid()
    n = 2**bits - 1
    assert grid.encoding == "unsigned" and float(grid.low) == 0.0
    torch.testing.assert_close(grid.step, q.alpha.detach())
    assert grid.thresholds.shape == (n,)
    assert bool((grid.thresholds[1:] >= grid.thresholds[:-1]).all())
    torch.testing.assert_close(grid.thresholds, q.biases / q.beta.detach())
    q.eval()
    out = q(x)
    codes = q.codes(x)
    assert torch.equal(out, grid.low + grid.step * codes)  # exactly on the uniform grid
    assert int(codes.max()) <= n and int(codes.min()) >= 0
    # codes are comparisons against the thresholds, not rounding
    manual = (x.unsqueeze(-1) >= grid.thresholds).sum(-1).float()
    assert torch.equal(codes, manual)


def test_signed_activations_fit_their_offset():
    q = QNQuantizer(2, "activation", options={"alpha_init": "inverse_beta"})
    q(torch.randn(500))
    assert bool(q.signed) and q.offset == 1.5  # the original's scale: a zero-centred target set
    levels = q.grid().dequantize(torch.arange(4.0)) / q.alpha.detach()
    torch.testing.assert_close(levels, torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    # by default offset and scale are the least-squares fit: skewed data keeps its lowest level near its floor
    torch.manual_seed(0)
    x = torch.where(torch.rand(4000) < 0.7, torch.full((4000,), -0.8), torch.rand(4000) * 2.8 - 0.8)
    q = QNQuantizer(4, "activation")
    q(x)
    grid, codes = q.grid(), q.codes(x)
    fit = grid.low + grid.step * codes
    centred = q.alpha.detach() * (codes - 7.5)
    assert abs(float(grid.low) + 0.8) < 0.1, float(grid.low)
    assert float(((fit - x) ** 2).mean()) < float(((centred - x) ** 2).mean())
    design = torch.stack([codes, torch.ones_like(codes)], 1).double()
    slope, intercept = torch.linalg.lstsq(design, x.double().unsqueeze(1)).solution.flatten()
    torch.testing.assert_close(grid.step.double(), slope, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grid.low.double(), intercept, rtol=1e-4, atol=1e-5)


def _brute_force_kmeans(values: list[float], k: int, iters: int = 100) -> list[int]:
    """Plain Lloyd iterations with argmin assignment, same evenly spaced start; returns labels."""
    lo, hi = min(values), max(values)
    centres = [lo + (hi - lo) * j / (k - 1) for j in range(k)]
    labels = [0] * len(values)
    for _ in range(iters):
        labels = [min(range(k), key=lambda j, v=v: (abs(v - centres[j]), j)) for v in values]
        new = []
        for j in range(k):
            members = [v for v, lab in zip(values, labels, strict=True) if lab == j]
            new.append(sum(members) / len(members) if members else centres[j])
        if new == centres:
            break
        centres = sorted(new)
    return labels


def test_kmeans_thresholds_match_a_brute_force_clustering():
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(40, generator=gen) * 0.3 + c for c in (-3.0, -1.0, 0.5, 2.5)])
    th = kmeans_thresholds(values, 4)
    labels = _brute_force_kmeans(sorted(values.double().tolist()), 4)
    xs = sorted(values.double().tolist())
    expected = [(xs[i] + xs[i + 1]) / 2 for i in range(len(xs) - 1) if labels[i] != labels[i + 1]]
    torch.testing.assert_close(th, torch.tensor(expected, dtype=torch.float32))
    # well-separated clusters: every threshold sits between two clusters
    for t, (a, b) in zip(th.tolist(), [(-3.0, -1.0), (-1.0, 0.5), (0.5, 2.5)], strict=True):
        assert a + 0.6 < t < b - 0.6
    assert torch.equal(kmeans_thresholds(values, 4), th)  # deterministic


def test_kmeans_with_more_clusters_than_distinct_values_stays_sorted():
    values = torch.tensor([0.0] * 50 + [1.0] * 3 + [2.0])
    th = kmeans_thresholds(values, 8)
    assert th.shape == (7,) and bool((th[1:] >= th[:-1]).all())
    xs, ends, centres = kmeans_1d(values, 8)
    assert int(ends[-1]) == 54 and bool((centres[1:] >= centres[:-1]).all())


def test_temperature_schedule_is_linear_and_capped():
    q = QNQuantizer(2, "weight", options={"temperature_start": 5.0, "temperature_end": 105.0})
    for p, t in ((0.0, 5.0), (0.25, 30.0), (1.0, 105.0)):
        q.update_schedule(p)
        assert float(q.temperature) == pytest.approx(t)
    capped = QNQuantizer(2, "weight", options={"temperature_end": 5000.0, "temperature_cap": 2000.0})
    capped.update_schedule(1.0)
    assert float(capped.temperature) == 2000.0


def test_update_schedules_reaches_every_qn_quantizer(tiny_net):
    q = fxquant.prepare(tiny_net, (torch.randn(2, 3, 12, 12),), fxquant.QuantConfig(quantizer="qn"))
    fxquant.update_schedules(q, 0.5)
    temps = {float(m.temperature) for m in fxquant.quantizers_of(q).values()}
    assert temps == {10.0 + (500.0 - 10.0) * 0.5}


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "qn", bits)
    layers = assert_frozen_matches_prepared(q, x)
    conv2 = layers["conv2"]
    assert conv2.weight_encoding == "bipolar" and conv2.input_thresholds is not None
    n = 2**bits - 1
    assert set(conv2.weight_int.unique().tolist()) <= set(range(-n, n + 1, 2))


def test_config_errors():
    assert_unknown_option_rejected(
        "qn", {"temperature_start", "temperature_end", "temperature_cap", "outlier_sigmas", "alpha_init"}
    )
    with pytest.raises(fxquant.ConfigError, match="alpha_init"):
        QNQuantizer(2, "weight", options={"alpha_init": "median"})
    with pytest.raises(fxquant.ConfigError, match="temperature"):
        QNQuantizer(2, "weight", options={"temperature_start": -1.0})
