"""Quantization Networks (Yang et al., CVPR 2019): soft/hard functions, gradients, both target sets, schedule."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant.errors import ConfigError
from fxquant.quantizers.base import search_clip_range
from fxquant.quantizers.qn import CLAMP, QNQuantizer, kmeans_1d, kmeans_thresholds, qn_hard, qn_soft
from tests.quantizers._common import assert_frozen_matches_prepared, assert_unknown_option_rejected, prepare_and_train

BIASES = torch.tensor([-1.5, -0.2, 0.0, 1.2])
#: uniform odd-integer weights (s = 2, o = 4), unit activations (s = 1, o = 0), the paper's power-of-two style set
TARGET_SETS = ([-4.0, -2.0, 0.0, 2.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0], [-4.0, -1.0, 0.0, 1.0, 4.0])
KMEANS = {"levels": "kmeans"}


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _paper_soft(x: float, alpha: float, beta: float, biases: list[float], t: float, q: list[float]) -> float:
    """α·(Σ_i s_i·σ(clamp(T(βx − b_i), −10, 10)) − o), s_i = q_i − q_{i−1}, o = −q_0; one sigmoid at a time."""
    total = 0.0
    for i, b in enumerate(biases):
        total += (q[i + 1] - q[i]) * _sigmoid(min(max(t * (beta * x - b), -10.0), 10.0))
    return alpha * (total + q[0])


def _paper_hard(x: float, alpha: float, beta: float, biases: list[float], q: list[float]) -> float:
    return alpha * (sum(q[i + 1] - q[i] for i, b in enumerate(biases) if beta * x - b >= 0) + q[0])


@pytest.mark.parametrize("t", [0.5, 3.0, 40.0])
@pytest.mark.parametrize("targets", TARGET_SETS)
def test_soft_function_matches_the_paper(t, targets):
    x = torch.linspace(-3, 3, 41)
    out = qn_soft(x, torch.tensor(0.7), torch.tensor(1.3), BIASES, t, torch.tensor(targets))
    expected = [_paper_soft(float(v), 0.7, 1.3, BIASES.tolist(), t, targets) for v in x]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_hard_function_matches_the_paper(targets):
    x = torch.linspace(-3, 3, 41)
    out = qn_hard(x, torch.tensor(0.7), torch.tensor(1.3), BIASES, torch.tensor(targets))
    expected = [_paper_hard(float(v), 0.7, 1.3, BIASES.tolist(), targets) for v in x]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_gradcheck_x_alpha_beta_where_smooth(targets):
    x = torch.linspace(-2.5, 2.5, 17, dtype=torch.float64).requires_grad_(True)
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    biases = BIASES.double()
    # |T(βx − b)| stays below the clamp, so the function is smooth here
    assert float((1.5 * (0.9 * x.detach()[:, None] - biases)).abs().max()) < CLAMP

    def f(x, alpha, beta):
        return qn_soft(x, alpha, beta, biases, 1.5, torch.tensor(targets, dtype=torch.float64))

    assert torch.autograd.gradcheck(f, (x, alpha, beta))


def test_clamped_region_uses_the_original_backward():
    """Where the sigmoid argument is clamped, ∂y/∂x = α·β·T·Σ s_i·σ(c)(1 − σ(c)) at the clamped c (original code)."""
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    alpha, beta, t = 0.5, 1.1, 200.0
    targets = TARGET_SETS[2]
    y = qn_soft(x, torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), BIASES.double(),
                t, torch.tensor(targets, dtype=torch.float64))
    y.sum().backward()
    for xv, g in zip(x.detach().tolist(), x.grad.tolist(), strict=True):
        slope = 0.0
        for i, b in enumerate(BIASES.tolist()):
            c = min(max(t * (beta * xv - b), -10.0), 10.0)
            slope += (targets[i + 1] - targets[i]) * _sigmoid(c) * (1.0 - _sigmoid(c))
        assert g == pytest.approx(alpha * beta * t * slope, rel=1e-9)
        assert g > 0


@pytest.mark.parametrize("t", [10.0, 37.0, 500.0])
@pytest.mark.parametrize("slope", [False, True])
def test_windowed_sum_equals_every_sigmoid(t, slope):
    """8 bits: the few thresholds near each value plus the clamped rest give the full 255-sigmoid sum."""
    from fxquant.quantizers.qn import _QNSoft, _window_width

    gen = torch.Generator().manual_seed(1)
    targets = torch.sort(torch.randn(256, generator=gen, dtype=torch.float64) * 40).values
    biases = (targets[1:] + targets[:-1]) / 2
    heights = targets[1:] - targets[:-1]
    z = torch.randn(2000, generator=gen, dtype=torch.float64) * 60
    temperature = torch.tensor(t, dtype=torch.float64)
    assert _window_width(biases, 2 * CLAMP / t) < 60  # the windowed path is the one under test
    windowed = _QNSoft.sigmoids(z, biases, heights, temperature, slope)
    full = _QNSoft.all_sigmoids(z, biases, heights, temperature, slope)
    torch.testing.assert_close(windowed, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [10.0, 80.0, 2000.0])
@pytest.mark.parametrize("targets", [torch.arange(-15.0, 16.0, 2.0), torch.arange(256.0, dtype=torch.float64) - 3.7])
def test_evenly_spaced_path_equals_the_general_one(t, targets):
    """Uniform targets: the arithmetic window gives the searched window's values and gradients."""
    biases = (targets[1:] + targets[:-1]) / 2
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(4000, generator=gen, dtype=torch.float64) * 1.2 - 0.1) * float(targets[-1] - targets[0])
    x = x + float(targets[0])
    args = (torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), biases.double(), t,
            targets.double())
    outs, grads = [], []
    for even in (True, False):
        xi = x.clone().requires_grad_(True)
        y = qn_soft(xi, *args, evenly_spaced=even)
        y.backward(torch.linspace(-1, 1, 4000, dtype=torch.float64))
        outs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("options", [{}, KMEANS])
@pytest.mark.parametrize("role,bits", [("weight", 2), ("weight", 3), ("activation", 2), ("activation", 4)])
def test_high_temperature_limit_is_the_hard_quantizer(role, bits, options):
    x = torch.randn(4, 300) * 1.5 + (0.0 if role == "weight" else 1.0)
    x = x.clamp_min(0) if role == "activation" else x
    q = QNQuantizer(bits, role, options=options)
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
    implied = ((soft / alpha).unsqueeze(-1) - q.targets).abs().argmin(-1).float()  # the nearest target
    assert torch.equal(implied[far], codes[far])
    # the clamp at ±10 leaves at most (q_n − q_0)·σ(−10)·α between the two (the original code's own gap)
    bound = float(q.targets[-1] - q.targets[0]) * _sigmoid(-CLAMP) * alpha * 1.01
    assert float((soft - hard)[far].abs().max()) <= bound
    # and without the clamp the limit is exact
    z = beta * x
    heights = q.targets[1:] - q.targets[:-1]
    unclamped = alpha * ((heights * torch.sigmoid(t * (z.unsqueeze(-1) - q.biases))).sum(-1) + q.targets[0])
    torch.testing.assert_close(unclamped[far], hard[far], rtol=1e-6, atol=1e-7)


def test_one_bit_weights_are_refused():
    """A learned 1-bit scale ``±α`` does not follow the batch-norm fold (see tests/quantizers/test_binary.py)."""
    with pytest.raises(ConfigError, match="'qn' cannot quantize weights to 1 bit"):
        QNQuantizer(1, "weight", channels=6)


@pytest.mark.parametrize("bits", [2, 3, 4])
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


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_weight_init_puts_biases_at_the_target_midpoints(bits):
    """α from the squared-error clip range, β = 1/α, b_i between odd integers: each weight takes its nearest level."""
    w = torch.randn(3, 50) * torch.tensor([[0.1], [1.0], [3.0]])
    q = QNQuantizer(bits, "weight", channels=3)
    q(w)
    n = 2**bits - 1
    _, high = search_clip_range(w, bits, signed=True, per_channel=True)
    torch.testing.assert_close(q.alpha.detach(), high / n)
    torch.testing.assert_close(q.beta.detach(), 1 / q.alpha.detach())
    torch.testing.assert_close(q.biases, torch.arange(-n + 1.0, n, 2))
    torch.testing.assert_close(q.grid().thresholds, q.biases[None, :] / q.beta.detach()[:, None])
    levels = q.alpha.detach()[:, None, None] * torch.arange(-n, n + 1.0, 2)
    nearest = (w.unsqueeze(-1) - levels).abs().argmin(-1).float()
    assert torch.equal(q.codes(w), nearest)


def test_kmeans_weight_init_follows_the_original_code():
    w = torch.randn(3, 50)
    q = QNQuantizer(2, "weight", channels=3, options=KMEANS)
    q(w)
    torch.testing.assert_close(q.beta.detach(), 1.25 * 3 / w.abs().amax(dim=1))
    torch.testing.assert_close(q.alpha.detach(), 1 / q.beta.detach())
    thresholds, centres = kmeans_thresholds(w * q.beta.detach()[:, None], 4)
    torch.testing.assert_close(q.biases, thresholds)
    torch.testing.assert_close(q.targets, centres)
    grid = q.grid()
    assert grid.encoding == "codebook" and not q.uniform
    assert grid.thresholds.shape == (3, 3) and grid.levels.shape == (3, 4)
    torch.testing.assert_close(grid.thresholds, q.biases[None, :] / q.beta.detach()[:, None])
    # the levels are the k-means centres in weight units (α = 1/β), one row per channel
    torch.testing.assert_close(grid.levels, centres[None, :] / q.beta.detach()[:, None])
    # consistent pair: each threshold lies between the two centres it separates
    assert bool((q.biases > q.targets[:-1]).all() and (q.biases < q.targets[1:]).all())


def test_kmeans_levels_fit_clustered_weights_better_than_uniform_ones():
    """Non-uniform data (a narrow centre and wide tails) is what the k-means target set is for."""
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(1, 900, generator=gen) * 0.05, torch.randn(1, 100, generator=gen) * 1.0], 1)
    errors = {}
    for name, options in (("uniform", {}), ("kmeans", KMEANS)):
        q = QNQuantizer(3, "weight", channels=1, options=options)
        q(w)
        q.eval()
        errors[name] = float((q(w) - w).pow(2).mean())
    assert errors["kmeans"] < 0.7 * errors["uniform"], errors


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_activation_levels_and_thresholds(bits):
    x = torch.relu(torch.randn(16, 8, 5, 5))
    q = QNQuantizer(bits, "activation")
    q(x)
    grid = q.grid()
    n = 2**bits - 1
    assert grid.encoding == "unsigned" and float(grid.low) == 0.0
    torch.testing.assert_close(grid.step, q.alpha.detach())
    low, high = search_clip_range(x, bits, signed=False, per_channel=False)
    torch.testing.assert_close(grid.step, (high - low) / n)
    assert grid.thresholds.shape == (n,)
    torch.testing.assert_close(grid.thresholds, q.biases / q.beta.detach())
    torch.testing.assert_close(q.biases, torch.arange(n) + 0.5)
    q.eval()
    out = q(x)
    codes = q.codes(x)
    assert torch.equal(out, grid.low + grid.step * codes)  # exactly on the uniform grid
    assert int(codes.max()) == n and int(codes.min()) == 0
    # codes are comparisons against the thresholds (here: rounding to the nearest level, clipped)
    manual = (x.unsqueeze(-1) >= grid.thresholds).sum(-1).float()
    assert torch.equal(codes, manual)
    nearest = torch.clamp(torch.floor(x / grid.step + 0.5), 0, n)
    assert float((codes != nearest).float().mean()) < 1e-3  # ties in float32 only


def test_kmeans_activation_levels_are_the_cluster_centres():
    x = torch.relu(torch.randn(16, 8, 5, 5)) ** 2
    q = QNQuantizer(2, "activation", options=KMEANS)
    q(x)
    grid = q.grid()
    assert grid.encoding == "codebook" and grid.levels.shape == (4,)
    assert bool((grid.levels[1:] > grid.levels[:-1]).all())
    torch.testing.assert_close(grid.levels, q.targets / q.beta.detach())
    gaps = grid.levels[1:] - grid.levels[:-1]
    assert float(gaps.max() / gaps.min()) > 1.2  # non-uniform
    q.eval()
    assert set(q(x).unique().tolist()) <= set(grid.levels.tolist())


def test_signed_activations_fit_their_lowest_level():
    torch.manual_seed(0)
    x = torch.where(torch.rand(4000) < 0.7, torch.full((4000,), -0.8), torch.rand(4000) * 2.8 - 0.8)
    q = QNQuantizer(4, "activation")
    q(x)
    assert bool(q.signed)
    grid, codes = q.grid(), q.codes(x)
    low, high = search_clip_range(x, 4, signed=False, per_channel=False)
    torch.testing.assert_close(grid.low, low)
    torch.testing.assert_close(grid.step, (high - low) / 15)
    assert abs(float(grid.low) + 0.8) < 0.1, float(grid.low)  # the background value has its own level
    fit = grid.low + grid.step * codes
    centred = q.alpha.detach() * (codes - 7.5)  # a zero-centred set with the same step
    assert float(((fit - x) ** 2).mean()) < float(((centred - x) ** 2).mean())
    torch.testing.assert_close(q.targets[1:] - q.targets[:-1], torch.ones(15))


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
    th, centres = kmeans_thresholds(values, 4)
    labels = _brute_force_kmeans(sorted(values.double().tolist()), 4)
    xs = sorted(values.double().tolist())
    expected = [(xs[i] + xs[i + 1]) / 2 for i in range(len(xs) - 1) if labels[i] != labels[i + 1]]
    torch.testing.assert_close(th, torch.tensor(expected, dtype=torch.float32))
    # well-separated clusters: every threshold sits between two clusters
    for t, (a, b) in zip(th.tolist(), [(-3.0, -1.0), (-1.0, 0.5), (0.5, 2.5)], strict=True):
        assert a + 0.6 < t < b - 0.6
    assert torch.equal(kmeans_thresholds(values, 4)[0], th)  # deterministic
    # the centres are the cluster means
    for c, lo, hi in zip(centres.tolist(), [-9, *th.tolist()], [*th.tolist(), 9], strict=True):
        members = values[(values >= lo) & (values < hi)]
        assert c == pytest.approx(float(members.double().mean()), abs=1e-5)


def test_kmeans_with_more_clusters_than_distinct_values_stays_sorted():
    values = torch.tensor([0.0] * 50 + [1.0] * 3 + [2.0])
    th, _ = kmeans_thresholds(values, 8)
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
    assert temps == {1.0 + (20.0 - 1.0) * 0.5}


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "qn", bits)
    layers = assert_frozen_matches_prepared(q, x)
    conv2 = layers["conv2"]
    assert conv2.weight_encoding == "bipolar" and conv2.input_thresholds is not None
    n = 2**bits - 1
    assert set(conv2.weight_int.unique().tolist()) <= set(range(-n, n + 1, 2))


@pytest.mark.parametrize("bits", [2, 3])
def test_kmeans_levels_freeze_to_a_codebook_equal_to_prepared_eval(tiny_net, bits):
    q, x = prepare_and_train(tiny_net, "qn", bits, options=KMEANS)
    layers = assert_frozen_matches_prepared(q, x)
    conv2 = layers["conv2"]
    assert conv2.weight_encoding == "codebook" and conv2.describe()["input_codebook"]


def test_config_errors():
    assert_unknown_option_rejected(
        "qn", {"temperature_start", "temperature_end", "temperature_cap", "outlier_sigmas", "levels"}
    )
    with pytest.raises(fxquant.ConfigError, match="levels='median' is invalid; allowed: uniform, kmeans"):
        QNQuantizer(2, "weight", options={"levels": "median"})
    with pytest.raises(fxquant.ConfigError, match="temperature"):
        QNQuantizer(2, "weight", options={"temperature_start": -1.0})
