import math

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.errors import ConfigError, FxQuantError
from fxquant.layers import QuantLayer
from fxquant.quantizers.grid import QuantGrid
from fxquant.training.loop import train_epoch
from fxquant.training.losses import SDQLoss, ebr_loss, ebr_terms, kd_loss, sdq_loss
from tests.passes.test_layer_graph import tiny_res


def _grid(bits: int, channels: int = 3, seed: int = 0) -> QuantGrid:
    g = torch.Generator().manual_seed(seed)
    high = torch.rand(channels, generator=g) + 0.5
    return QuantGrid(bits, "bipolar", high / (2**bits - 1), torch.zeros(channels))


def _reference_ebr(weight: torch.Tensor, levels: torch.Tensor, spacing: torch.Tensor, tau: float):
    """Per element: nearest level, distance in steps, softmax over every level; written with loops."""
    channels, k = levels.shape
    centre, occupancy, count = 0.0, [0.0] * k, 0
    for c in range(channels):
        for w in weight[c].reshape(-1).tolist():
            d = [(w - float(levels[c, j])) / float(spacing[c]) for j in range(k)]
            nearest = min(range(k), key=lambda j: abs(d[j]))
            centre += d[nearest] ** 2
            e = [math.exp(-(dj**2) / tau) for dj in d]
            for j in range(k):
                occupancy[j] += e[j] / sum(e)
            count += 1
    occupancy = [o / count for o in occupancy]
    entropy = -sum(o * math.log(o) for o in occupancy if o > 0)
    return centre / count, 1.0 - entropy / math.log(k)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_ebr_matches_its_formula_on_a_uniform_grid(bits):
    grid = _grid(bits)
    weight = torch.randn(3, 2, 3, 3) * 0.6
    levels = grid.low.unsqueeze(1) + grid.step.unsqueeze(1) * torch.arange(2**bits)
    want = _reference_ebr(weight, levels, grid.step, tau=0.5)
    centre, entropy = ebr_terms(weight, grid, temperature=0.5, window=None)
    assert float(centre) == pytest.approx(want[0], rel=1e-5)
    assert float(entropy) == pytest.approx(want[1], rel=1e-5, abs=1e-6)


def test_ebr_window_approximates_all_levels_and_matches_a_codebook_grid():
    grid = _grid(4, seed=2)
    weight = torch.randn(3, 40) * 0.5
    full = ebr_terms(weight, grid, window=None)
    windowed = ebr_terms(weight, grid, window=2)
    assert float(windowed[0]) == float(full[0])
    assert float(windowed[1]) == pytest.approx(float(full[1]), abs=1e-5)
    levels = torch.tensor([-1.0, -0.3, 0.2, 1.0])  # non-uniform: positions in units of the mean spacing 2/3
    codebook = QuantGrid(2, "codebook", torch.tensor(1.0), torch.tensor(0.0), levels=levels)
    w = torch.randn(2, 10)
    want = _reference_ebr(w, levels.expand(2, 4), torch.full((2,), 2.0 / 3.0), tau=0.5)
    got = ebr_terms(w, codebook)
    assert float(got[0]) == pytest.approx(want[0], rel=1e-5)
    assert float(got[1]) == pytest.approx(want[1], rel=1e-5, abs=1e-6)


def test_ebr_pulls_weights_to_their_levels_and_spreads_occupancy():
    grid = _grid(2, channels=1)
    step, low = float(grid.step), float(grid.low)
    on_levels = (low + step * torch.arange(4.0)).repeat(25).reshape(1, -1)
    centre, entropy = ebr_terms(on_levels, grid)
    assert float(centre) == pytest.approx(0.0, abs=1e-10)
    assert float(entropy) < 0.05  # equal use of the 4 levels (soft assignments blur it a little)
    collapsed = torch.full((1, 100), low + step * 1.3)  # every weight in bin 1, 0.3 steps from its level
    c2, e2 = ebr_terms(collapsed, grid)
    assert float(c2) == pytest.approx(0.3**2, rel=1e-5)
    assert float(e2) > float(entropy) + 0.4
    w = (torch.randn(1, 200) * step).requires_grad_()
    c, e = ebr_terms(w, grid)
    (c + e).backward()
    with torch.no_grad():
        moved = w - 0.05 * w.grad / w.grad.abs().max() * step
    assert float(ebr_terms(moved, grid)[0]) < float(c.detach())


def test_ebr_loss_averages_the_layers_of_a_prepared_model():
    x = torch.randn(4, 1, 8, 8)
    qmodel = fxquant.prepare(tiny_res(), (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=3))
    terms = []
    for layer in qmodel.modules():
        if isinstance(layer, QuantLayer):
            c, e = ebr_terms(layer.folded_weight_bias()[0], layer.weight_quant.grid())
            terms.append(c.item() + e.item())
    assert ebr_loss(qmodel).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    loss = ebr_loss(qmodel)
    loss.backward()
    assert qmodel.get_submodule("a").layer.weight.grad.abs().sum() > 0
    with pytest.raises(FxQuantError, match="no quantized layer"):
        ebr_loss(torch.nn.Linear(2, 2))


def test_kd_loss_is_hintons_softened_kl():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    for temp in (1.0, 4.0):
        ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
        want = temp**2 * float((pt * (pt.log() - ps.log())).sum(1).mean())
        assert float(kd_loss(s, t, temp)) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(s, t, 0.0)


def test_sdq_loss_combines_ce_kd_and_ebr_and_trains_in_train_epoch():
    teacher = tiny_res()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    qmodel = fxquant.prepare(teacher, (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=3)).train()
    loss_fn = sdq_loss(qmodel, teacher, kd_weight=0.3, temperature=2.0, ebr_weight=0.1)
    logits = qmodel(x)
    with torch.no_grad():
        t_logits = teacher(x)
    want = 0.7 * F.cross_entropy(logits, y) + 0.3 * kd_loss(logits, t_logits, 2.0) + 0.1 * ebr_loss(qmodel)
    assert loss_fn(logits, y, x).item() == pytest.approx(want.item(), rel=1e-6)
    no_teacher = SDQLoss(qmodel, ebr_weight=0.0)
    assert no_teacher(logits, y, x).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    before = [p.detach().clone() for p in teacher.parameters()]
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    loss = train_epoch(qmodel, [(x, y), (x, y)], optimizer, progress=False, loss_fn=loss_fn)
    assert math.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    with pytest.raises(ConfigError, match="kd_weight"):
        sdq_loss(qmodel, teacher, kd_weight=1.5)
