"""LCQ (Yamamoto, CVPR 2021): compander, forward, gradients (docs/design.md, "LCQ"), codebook levels, freeze."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.quantizers.lcq import LCQQuantizer, compand, compander, expand, lcq_quantize
from tests.quantizers._common import assert_frozen_matches_prepared, assert_unknown_option_rejected, prepare_and_train

K = 16


def _theta(seed: int = 1, k: int = K, scale: float = 0.8) -> torch.Tensor:
    return torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _ref_params(theta: list[float]) -> tuple[list[float], list[float]]:
    e = [math.exp(t) for t in theta]
    p = [v / sum(e) for v in e]
    k = len(p)
    return [k * v for v in p], [sum(p[:j]) for j in range(k)]


def _ref_g(v: float, gamma: list[float], beta: list[float]) -> float:
    k = len(gamma)
    for j in range(k):
        if j / k <= v < (j + 1) / k or (j == k - 1 and v >= 1.0):
            return gamma[j] * (v - j / k) + beta[j]
    raise AssertionError(v)


def _ref_ginv(y: float, gamma: list[float], beta: list[float]) -> float:
    k = len(gamma)
    for j in reversed(range(k)):
        if beta[j] <= y:
            return (y - beta[j]) / gamma[j] + j / k
    raise AssertionError(y)


def _ref_q(x: float, alpha: float, theta: list[float] | None, s: int, symmetric: bool) -> float:
    """Q(x) = sgn(x)·α·g⁻¹(round(s·g(|x|/α))/s) for |x| < α, else sgn(x)·α (unsigned: x clipped at 0)."""
    if symmetric:
        sgn, mag = (1.0 if x >= 0 else -1.0), abs(x)
    else:
        sgn, mag = 1.0, max(x, 0.0)
    if mag >= alpha:
        return sgn * alpha
    if theta is None:
        return sgn * alpha * math.floor(s * mag / alpha + 0.5) / s
    gamma, beta = _ref_params(theta)
    y = _ref_g(mag / alpha, gamma, beta)
    return sgn * alpha * _ref_ginv(math.floor(s * y + 0.5) / s, gamma, beta)


# -- the compander -----------------------------------------------------------------------------------------


def test_compander_is_identity_at_init_and_monotone_otherwise():
    v = torch.linspace(0, 1, 1001, dtype=torch.float64)
    gamma, beta = compander(torch.zeros(K, dtype=torch.float64))
    torch.testing.assert_close(compand(v, gamma, beta), v)
    gamma, beta = compander(_theta())
    g = compand(v, gamma, beta)
    assert float(g[0]) == 0.0 and float(g[-1]) == pytest.approx(1.0, abs=1e-12)
    assert bool((g[1:] > g[:-1]).all())
    torch.testing.assert_close(expand(g, gamma, beta), v)  # g⁻¹(g(v)) = v
    y = torch.linspace(0, 1, 777, dtype=torch.float64)
    torch.testing.assert_close(compand(expand(y, gamma, beta), gamma, beta), y)
    ref_gamma, ref_beta = _ref_params(_theta().tolist())
    torch.testing.assert_close(gamma, torch.tensor(ref_gamma, dtype=torch.float64))
    torch.testing.assert_close(beta, torch.tensor(ref_beta, dtype=torch.float64))
    assert float(gamma.mean()) == pytest.approx(1.0)  # slopes K·softmax average to 1


# -- forward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric,s", [(False, 3), (False, 15), (True, 1), (True, 7)])
@pytest.mark.parametrize("companded", [False, True])
def test_forward_matches_the_paper(symmetric, s, companded):
    x = torch.linspace(-2.3, 2.3, 97, dtype=torch.float64)
    theta = _theta()
    gamma, beta = compander(theta) if companded else (None, None)
    out = lcq_quantize(x, torch.tensor(1.7, dtype=torch.float64), gamma, beta, s, symmetric)
    expected = [_ref_q(float(v), 1.7, theta.tolist() if companded else None, s, symmetric) for v in x]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# -- gradients (docs/design.md, "LCQ") -----------------------------------------------------------------------


@pytest.mark.parametrize("symmetric,s", [(False, 7), (True, 3)])
def test_gradients_x_alpha_gamma_beta_match_the_formulas(symmetric, s):
    x = torch.linspace(-2.0, 2.0, 61, dtype=torch.float64)
    x = (x + 0.013).requires_grad_(True)  # off the segment edges and rounding ties
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    g0, b0 = compander(_theta(2))
    gamma, beta = g0.detach().clone().requires_grad_(True), b0.detach().clone().requires_grad_(True)
    z = lcq_quantize(x, alpha, gamma, beta, s, symmetric)
    weights = torch.linspace(0.5, 1.5, x.numel(), dtype=torch.float64)  # dL/dz, not all ones
    (z * weights).sum().backward()

    xs, zs, ws = x.detach().tolist(), z.detach().tolist(), weights.tolist()
    gl, bl = gamma.detach().tolist(), beta.detach().tolist()
    dx, da = [], 0.0
    dgamma, dbeta = [0.0] * K, [0.0] * K
    for xv, zv, w in zip(xs, zs, ws, strict=True):
        mag = abs(xv) if symmetric else max(xv, 0.0)
        inside = (abs(xv) < 1.3) if symmetric else (0.0 <= xv < 1.3)
        sgn = (1.0 if xv >= 0 else -1.0) if symmetric else 1.0
        dx.append(w * (1.0 if inside else 0.0))  # ∂Q/∂x = 1{|x|<α}
        da += w * (zv / 1.3 - (xv / 1.3 if inside else 0.0))  # ∂Q/∂α = Q/α − (x/α)·1{|x|<α}
        if not inside:
            continue
        v = mag / 1.3
        kx = min(int(v * K), K - 1)
        yq = math.floor(s * _ref_g(v, gl, bl) + 0.5) / s
        kq = max(j for j in range(K) if bl[j] <= yq)
        dgamma[kx] += w * sgn * 1.3 * (v - kx / K) / gl[kq]
        dgamma[kq] -= w * sgn * 1.3 * (yq - bl[kq]) / gl[kq] ** 2
        dbeta[kx] += w * sgn * 1.3 / gl[kq]
        dbeta[kq] -= w * sgn * 1.3 / gl[kq]
    torch.testing.assert_close(x.grad, torch.tensor(dx, dtype=torch.float64))
    assert float(alpha.grad) == pytest.approx(da, rel=1e-10)
    torch.testing.assert_close(gamma.grad, torch.tensor(dgamma, dtype=torch.float64))
    torch.testing.assert_close(beta.grad, torch.tensor(dbeta, dtype=torch.float64))
    assert float(gamma.grad.abs().sum()) > 0 and float(beta.grad.abs().sum()) > 0


def test_theta_gradient_is_the_chain_rule_through_the_softmax():
    x = torch.linspace(0.01, 1.9, 57, dtype=torch.float64)
    theta = _theta(4).requires_grad_(True)
    alpha = torch.tensor(1.5, dtype=torch.float64)
    gamma, beta = compander(theta)
    gamma.retain_grad()
    beta.retain_grad()
    lcq_quantize(x, alpha, gamma, beta, 7, False).pow(2).sum().backward()
    p = torch.softmax(theta.detach(), 0)
    dp = torch.diag(p) - p[:, None] * p[None, :]  # ∂p_k/∂θ_j
    jac_gamma = K * dp
    jac_beta = torch.stack([dp[:k].sum(0) if k else torch.zeros(K, dtype=torch.float64) for k in range(K)])
    expected = jac_gamma.T @ gamma.grad + jac_beta.T @ beta.grad
    torch.testing.assert_close(theta.grad, expected)
    assert float(theta.grad.abs().sum()) > 0


def test_clipped_inputs_have_no_compander_gradient():
    x = torch.tensor([2.0, -3.0, 5.0], dtype=torch.float64)
    theta = _theta().requires_grad_(True)
    gamma, beta = compander(theta)
    z = lcq_quantize(x, torch.tensor(1.0, dtype=torch.float64), gamma, beta, 3, True)
    torch.testing.assert_close(z, torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    z.sum().backward()
    assert float(theta.grad.abs().max()) == 0.0


def test_quantizer_alpha_gradient_is_scaled():
    x = torch.rand(4, 30, dtype=torch.float64) * 2
    q = LCQQuantizer(3, "activation").double()
    q(x)
    q.train()
    q(x).sum().backward()
    scaled = float(q.alpha.grad)
    q2 = LCQQuantizer(3, "activation", options={"grad_scale": False}).double()
    q2(x)
    assert torch.equal(q2.alpha, q.alpha) and float(q2.alpha_grad_scale) == 1.0
    q2.train()
    q2(x).sum().backward()
    assert scaled == pytest.approx(float(q2.alpha.grad) / math.sqrt(30 * 7), rel=1e-9)


# -- levels -----------------------------------------------------------------------------------------------


def _perturbed(q: LCQQuantizer, seed: int = 5) -> LCQQuantizer:
    if q.theta is not None:
        with torch.no_grad():
            q.theta.copy_(_theta(seed, q.theta.numel()).float())
    return q


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_activation_levels(bits):
    x = torch.rand(200) * 3
    q = _perturbed(LCQQuantizer(bits, "activation"))
    q(x)
    grid = q.grid()
    assert grid.encoding == "codebook" and not grid.uniform and not q.uniform
    levels, alpha = grid.levels, float(q.alpha.detach())
    assert levels.shape == (2**bits,)
    assert float(levels[0]) == 0.0 and float(levels[-1]) == pytest.approx(alpha)
    assert bool((levels[1:] > levels[:-1]).all())
    gamma, beta = compander(q.theta.detach().double())
    s = 2**bits - 1
    expected = [alpha * float(expand(torch.tensor([j / s], dtype=torch.float64), gamma, beta)) for j in range(s + 1)]
    torch.testing.assert_close(levels, torch.tensor(expected, dtype=torch.float32))
    if bits >= 2:
        gaps = levels[1:] - levels[:-1]
        assert float(gaps.max() - gaps.min()) > 1e-3 * alpha  # non-uniform
    # at θ = 0 the levels are uniform
    u = LCQQuantizer(bits, "activation")
    u(x)
    torch.testing.assert_close(u.grid().levels, torch.arange(2.0**bits) / s * u.alpha.detach())


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_levels_symmetric_with_zero(bits):
    w = torch.randn(4, 30)
    q = _perturbed(LCQQuantizer(bits, "weight", channels=4))
    q(w)
    levels = q.grid().levels
    s = 2 ** (bits - 1) - 1
    assert levels.shape == (4, 2 * s + 1)
    torch.testing.assert_close(levels, -levels.flip(1))
    assert bool((levels[:, s] == 0).all())
    torch.testing.assert_close(levels[:, -1], q.alpha.detach() * q.norm)
    assert bool((levels[:, 1:] > levels[:, :-1]).all())


def test_two_bit_weights_are_uniform_ternary_whatever_theta():
    w = torch.randn(3, 40)
    q = _perturbed(LCQQuantizer(2, "weight", channels=3))
    q(w)
    grid = q.grid()
    scale = (q.alpha.detach() * q.norm)[:, None]
    torch.testing.assert_close(grid.levels, torch.tensor([-1.0, 0.0, 1.0]) * scale)
    torch.testing.assert_close(grid.thresholds, torch.tensor([-0.5, 0.5]) * scale)
    assert q.theta is None and not q.companding
    assert all(p.requires_grad for p in q.parameters())


def test_one_bit_weights_are_sign_times_alpha():
    w = torch.randn(3, 40)
    q = LCQQuantizer(1, "weight", channels=3)
    q(w)
    q.eval()
    out = q(w)
    torch.testing.assert_close(out, torch.where(w >= 0, 1.0, -1.0) * (q.alpha.detach() * q.norm)[:, None])


@pytest.mark.parametrize("role,bits", [("activation", 3), ("weight", 4)])
def test_hard_forward_is_the_training_forward_on_codes(role, bits):
    x = torch.randn(6, 50) * (1.0 if role == "weight" else 2.0)
    x = x if role == "weight" else x.relu()
    q = _perturbed(LCQQuantizer(bits, role, channels=6 if role == "weight" else None))
    q(x)
    q.train()
    soft = q(x).detach()
    q.eval()
    hard = q(x)
    codes = q.codes(x)
    assert torch.equal(hard, q.grid().dequantize(codes))
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-6)
    # codes are the rounding of the companded value (away from ties)
    gamma, beta = compander(q.theta.detach())
    scale = q.view(q.alpha.detach() * q.norm, x)
    y = compand(torch.clamp(x.abs() / scale, max=1), gamma, beta)
    s = q.s
    mag_codes = torch.floor(s * y + 0.5)
    far = ((s * y - torch.floor(s * y) - 0.5).abs() > 1e-4)
    signed = torch.where(x >= 0, mag_codes, -mag_codes) + (s if q.symmetric else 0)
    assert torch.equal(codes[far], signed[far])


def test_weight_normalisation_is_scale_equivariant():
    w = torch.randn(5, 3, 3, 3)
    q = _perturbed(LCQQuantizer(4, "weight", channels=5))
    q(w)
    q.eval()
    out = q(w)
    torch.testing.assert_close(q.norm, w.reshape(5, -1).std(dim=1, unbiased=False))
    scaled = q(w * 3.0)
    torch.testing.assert_close(scaled, out * 3.0, rtol=1e-5, atol=1e-6)
    plain = LCQQuantizer(4, "weight", channels=5, options={"weight_norm": False})
    plain(w)
    assert bool((plain.norm == 1).all())


def test_integer_weight_requantizes_levels_to_int8():
    w = torch.randn(4, 30)
    q = _perturbed(LCQQuantizer(4, "weight", channels=4))
    q(w)
    codes = q.codes(w)
    ints, scale = q.integer_weight(codes)
    levels = q.grid().levels
    expected_scale = levels.abs().amax(dim=1) / 127
    torch.testing.assert_close(scale, expected_scale)
    expected = torch.floor(q.grid().dequantize(codes) / expected_scale[:, None] + 0.5)
    assert torch.equal(ints.float(), expected)
    assert int(ints.abs().max()) == 127
    torch.testing.assert_close(ints * scale[:, None], q.grid().dequantize(codes), rtol=0, atol=float(scale.max()) / 2)


def test_codebook_activation_lookup_in_the_integer_layer(tiny_net):
    def perturb(model):
        for quant in fxquant.quantizers_of(model).values():
            _perturbed(quant, seed=7)

    q, x = prepare_and_train(tiny_net, "lcq", 3, steps=1, perturb=perturb)
    layers = assert_frozen_matches_prepared(q, x)
    conv2 = layers["conv2"]
    assert conv2.describe()["input_codebook"] and conv2.weight_encoding == "codebook"
    aq = q.get_submodule("conv2.input_quant")
    grid = aq.grid()
    # independent integer evaluation: lookup, int64 convolution, float32 rescale
    inp = {}
    hook = q.get_submodule("conv2").register_forward_pre_hook(lambda m, a: inp.setdefault("x", a[0]))
    with torch.no_grad():
        q(x)
    hook.remove()
    codes = conv2.codes_from_values(inp["x"])
    assert torch.equal(grid.dequantize(codes), inp["x"])
    assert int(grid.levels_int.max()) == 255 and int(grid.levels_int.min()) == 0  # an unsigned 8-bit table
    acc = F.conv2d(grid.levels_int[codes.long()].double(), conv2.weight_int.double(), None, 1, 1).round().long()
    assert torch.equal(acc, conv2.accumulate(conv2.input_values(codes)))


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_equals_prepared_eval(tiny_net, bits):
    def perturb(model):
        for quant in fxquant.quantizers_of(model).values():
            _perturbed(quant, seed=11)

    q, x = prepare_and_train(tiny_net, "lcq", bits, perturb=perturb)
    layers = assert_frozen_matches_prepared(q, x)
    assert all(layer.weight_encoding == "codebook" for layer in layers.values())
    assert layers["conv1"].input_levels_int is not None and int(layers["conv1"].input_levels_int.min()) < 0


def test_config_errors():
    assert_unknown_option_rejected("lcq", {"segments", "weight_norm", "grad_scale"})
    with pytest.raises(fxquant.ConfigError, match="segments"):
        LCQQuantizer(3, "weight", options={"segments": 0})
