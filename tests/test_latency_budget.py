"""Latency budgets: the per-layer latency table, its expectation under the DBPs, bit-width ladders, the plan."""

import json
import random

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Budget, BudgetError, ConfigError, SearchOptions
from fxquant.backends.tvm.latency_table import build_latency_table
from fxquant.passes.analysis.cost_model import LayerCost, expected_plan_cost, plan_cost, useful_bits, with_latency
from fxquant.plan import BitwidthPlan
from fxquant.sdq.rounding import round_to_budget
from fxquant.sdq.search import _sdq_config, fixed_bits
from fxquant.sdq.units import Unit, attach_dbps, expected_cost, layer_bits, search_units, with_ladders
from tests.conftest import calibrate_bn

FAST = SearchOptions(steps=2, interval=1)
EDGES = ("stem", "fc")  # first and last layers: fixed at QuantConfig.first_last_bits=8


class Net(nn.Module):
    """A small conv net whose widths vary, so that tables and ladders differ between nets."""

    def __init__(self, widths: tuple[int, int, int]):
        super().__init__()
        a, b, c = widths
        self.stem = nn.Conv2d(1, a, 3, padding=1)
        self.conv1 = nn.Conv2d(a, b, 3, padding=1)
        self.conv2 = nn.Conv2d(b, c, 3, stride=2, padding=1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _net(seed: int = 0, widths: tuple[int, int, int] = (8, 16, 16)) -> nn.Module:
    torch.manual_seed(seed)
    return calibrate_bn(Net(widths), (4, 1, 12, 12))


def _data(batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 1, 12, 12, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(batches)]


def _table_for(model: nn.Module, budget: Budget):
    """The table of the budget's target, built independently of the search that used it (first and last
    layers at 8 bits, the others at every weight bit-width and the budget's activation bits)."""
    gm = fxquant.prepare(model, (_data(1)[0][0],), fxquant.QuantConfig(quantizer="dsq", act_bits=budget.act_bits))
    pairs = {n: [(8, 8)] if n in EDGES else [(w, budget.act_bits) for w in range(budget.min_bits, 9)]
             for n in ("stem", "conv1", "conv2", "fc")}
    return build_latency_table(gm, pairs, budget.target, budget.cost_model, budget.threads, budget.batch, False)


# -- the cost model ---------------------------------------------------------------------------------------


def test_budget_latency_fields_are_checked():
    b = Budget(latency_ms=2.5, target="cortex-a72")
    assert (b.metric, b.bound, b.cost_model) == ("latency_ms", 2.5, "model")
    assert Budget(latency_ms=1.0).cost_model == "measure"
    assert Budget.from_dict(b.to_dict()) == b
    assert "target" not in Budget(bitops=1e6).to_dict()
    with pytest.raises(ConfigError, match="Budget.target='cortex-x9' is invalid"):
        Budget(latency_ms=1.0, target="cortex-x9")
    with pytest.raises(ConfigError, match="cost_model='measure' is invalid for target 'cortex-a76'"):
        Budget(latency_ms=1.0, target="cortex-a76", cost_model="measure")
    with pytest.raises(ConfigError, match="Budget.target applies to a latency_ms budget only"):
        Budget(bitops=1e6, target="cortex-a76")
    with pytest.raises(ConfigError, match="Budget.threads=0"):
        Budget(latency_ms=1.0, threads=0)


def test_expected_latency_is_the_hand_computed_sum_and_differentiable():
    x = LayerCost("x", "Conv2d", 0, 0, 0, {(4, 8): 3.0, (2, 8): 1.0, (4, 4): 2.0, (2, 4): 0.5})
    y = LayerCost("y", "Conv2d", 0, 0, 0, {(8, 8): 5.0, (8, 4): 4.0})
    p = torch.tensor(0.3, requires_grad=True)
    q = torch.tensor(0.6)
    w = {"x": ((4, p), (2, 1 - p)), "y": ((8, 1.0),)}
    a = {"x": ((8, q), (4, 1 - q)), "y": ((8, q), (4, 1 - q))}
    got = expected_plan_cost({"x": x, "y": y}, "latency_ms", w, a)
    want = 0.3 * 0.6 * 3.0 + 0.7 * 0.6 * 1.0 + 0.3 * 0.4 * 2.0 + 0.7 * 0.4 * 0.5 + 0.6 * 5.0 + 0.4 * 4.0
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    assert float(p.grad) == pytest.approx(0.6 * (3.0 - 1.0) + 0.4 * (2.0 - 0.5), rel=1e-6)
    # integer bits: the table's own entries
    assert plan_cost({"x": x, "y": y}, "latency_ms", {"x": 2, "y": 8}, {"x": 4, "y": 4}) == pytest.approx(4.5)
    with pytest.raises(ConfigError, match="layer 'x': the latency table has no entry for w3a8"):
        plan_cost({"x": x}, "latency_ms", {"x": 3}, {"x": 8})


def test_useful_bits_drop_what_costs_as_much_as_a_higher_bit_width():
    # an int8 dot-product core: 3..7 bits run the 8-bit kernel's speed, 1-2 bits are bit-serial
    assert useful_bits({8: 4.0, 7: 3.0, 6: 3.0, 5: 3.0, 4: 3.0, 3: 3.0, 2: 2.0, 1: 1.0}) == (1, 2, 7, 8)
    assert useful_bits({8: 4.0, 4: 2.0, 3: 5.0, 2: 1.0}) == (2, 4, 8)  # 3 bits cost more than 4
    assert useful_bits({b: float(b) for b in range(2, 9)}) == tuple(range(2, 9))


def test_search_expectation_uses_the_ladder_below_each_unit():
    """E[latency] of a prepared model with DBPs: each unit at its bits with p, at the next rung down with 1 − p."""
    model = _net()
    budget = Budget(latency_ms=1.0, target="host", cost_model="model", act_bits=4)
    config = _sdq_config(fxquant.QuantConfig(), budget, FAST)
    gm = fxquant.prepare(model, (_data(1)[0][0],), config)
    from fxquant.passes.analysis.cost_model import layer_costs
    from fxquant.passes.analysis.layer_graph import tie_groups

    fw, fa = fixed_bits(gm, fxquant.QuantConfig(), budget)
    rng = random.Random(0)
    names = list(fw) + [n for n in ("conv1", "conv2") if n not in fw]
    table = {n: {(w, a): rng.uniform(0.1, 1.0) for w in range(1, 9) for a in range(1, 9)} for n in names}
    table["conv1"].update({(w, 4): 1.0 for w in range(5, 8)})  # 5..7 bits no cheaper than 8
    table["conv1"][(8, 4)] = 1.0
    costs = with_latency(layer_costs(gm), table)
    units = with_ladders(search_units(tie_groups(gm, FAST.ties), fw, fa), costs, budget)
    ladder = {u.key: u.ladder for u in units if u.searched}
    assert 5 not in ladder["w:conv1"] and 6 not in ladder["w:conv1"] and 7 not in ladder["w:conv1"]
    attach_dbps(gm, units, budget.max_bits)
    with torch.no_grad():
        gm.get_submodule("conv1.weight_quant").logit.fill_(0.5)
        gm.get_submodule("conv2.weight_quant").logit.fill_(-1.0)
    p1, p2 = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-1.0))
    low1 = max(b for b in ladder["w:conv1"] if b < 8)
    low2 = max(b for b in ladder["w:conv2"] if b < 8)
    want = sum(table[n][(fw[n], fa[n])] for n in fw)
    want += p1 * table["conv1"][(8, 4)] + (1 - p1) * table["conv1"][(low1, 4)]
    want += p2 * table["conv2"][(8, 4)] + (1 - p2) * table["conv2"][(low2, 4)]
    assert float(expected_cost(gm, units, costs, "latency_ms").detach()) == pytest.approx(float(want), rel=1e-6)
    assert gm.get_submodule("conv1.weight_quant").lower_bits == low1


@pytest.mark.parametrize("seed", range(8))
def test_rounding_meets_random_latency_budgets_exactly_on_the_ladders(seed):
    """Random tables (some with plateaus), random budgets: the rounded plan's table latency is within budget,
    every unit sits on its ladder, and no single rung up would still fit (the budget is spent)."""
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(rng.randint(3, 7))]
    table = {}
    for n in names:
        row, value = {}, rng.uniform(0.05, 0.2)
        for w in range(1, 9):
            value += rng.choice([0.0, 0.0, rng.uniform(0.01, 0.3)])  # plateaus: bits a kernel cannot exploit
            row[(w, 8)] = value
        table[n] = row
    costs = with_latency({n: LayerCost(n, "Conv2d", 100, 100, 0) for n in names}, table)
    budget = Budget(latency_ms=1.0, act_bits=8, min_bits=2, max_bits=8, target="host", cost_model="model")
    units = with_ladders(tuple(Unit(f"w:{n}", "weight", (n,)) for n in names)
                         + tuple(Unit(f"a:{n}", "activation", (n,), 8) for n in names), costs, budget)
    lowest = sum(table[n][(u.ladder[0], 8)] for u in units if u.searched for n in u.members)
    highest = sum(table[n][(8, 8)] for n in names)
    bound = rng.uniform(lowest, highest)
    budget = Budget(latency_ms=bound, act_bits=8, min_bits=2, max_bits=8, target="host", cost_model="model")
    start = {u.key: (8 if u.searched else 8) for u in units}
    sens = {u.key: {8: rng.uniform(0, 1)} for u in units if u.searched}
    bits = round_to_budget(units, start, sens, costs, budget)
    w, a = layer_bits(units, bits)
    achieved = plan_cost(costs, "latency_ms", w, a)
    assert achieved <= bound * (1 + 1e-9)
    for u in units:
        if u.searched:
            assert bits[u.key] in u.ladder
            up = u.above(bits[u.key], budget)
            if up is not None:
                assert plan_cost(costs, "latency_ms", *layer_bits(units, {**bits, u.key: up})) > bound


# -- the search ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "widths"), [("host", (8, 16, 32)), ("cortex-a72", (16, 16, 24))])
def test_latency_plan_meets_budget_by_an_independent_table(target, widths):
    model = _net(1, widths)
    model_budget = dict(target=target, act_bits=2, **({"cost_model": "model"} if target == "host" else {}))
    probe = _table_for(model, Budget(latency_ms=1.0, **model_budget))
    names = list(probe.latency_ms)
    lowest_bits = {n: (8, 8) if n in EDGES else (2, 2) for n in names}
    top = probe.total_ms({n: (8, 8) if n in EDGES else (8, 2) for n in names})
    low = probe.total_ms(lowest_bits)
    budget = Budget(latency_ms=low + 0.4 * (top - low), **model_budget)
    plan = fxquant.search(model, (_data(1)[0][0],), _data(), budget, options=FAST, progress=False)
    table = _table_for(model, budget)  # priced again, not the search's own numbers
    assert table.total_ms(plan.bits) <= budget.bound * (1 + 1e-9)
    meta = plan.metadata["latency"]
    assert meta["estimate_ms"] == pytest.approx(table.total_ms(plan.bits), rel=1e-9)
    assert plan.metadata["achieved"] == pytest.approx(meta["estimate_ms"])
    for key, ladder in meta["ladders"].items():  # every searched layer sits on its ladder
        assert plan.bits[key[2:]][0] in ladder


def test_infeasible_latency_budget_fails_before_training_naming_the_lowest_latency():
    model = _net(2)
    budget = Budget(latency_ms=1e-6, target="cortex-a72", act_bits=4)

    def never():
        raise AssertionError("the search must not train")
        yield

    with pytest.raises(BudgetError, match=r"latency_ms=1e-06 cannot be met: the minimum achievable latency_ms is") as e:
        fxquant.search(model, (_data(1)[0][0],), never(), budget, options=FAST, progress=False)
    lowest = float(str(e.value).split("latency_ms is ")[1].split(" ")[0])
    table = _table_for(model, budget)
    names = list(table.latency_ms)
    floor = {n: (8, 8) if n in EDGES else (2, 4) for n in names}
    assert lowest == pytest.approx(table.total_ms(floor), rel=1e-5)


def test_plan_json_records_target_cost_model_version_and_estimate(tmp_path):
    model = _net(3)
    budget = Budget(latency_ms=1.0, target="cortex-a76", act_bits=4)
    plan = fxquant.search(model, (_data(1)[0][0],), _data(), budget, options=FAST, progress=False)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    meta = data["metadata"]["latency"]
    assert (meta["target"], meta["cost_model"], meta["threads"], meta["batch"]) == ("cortex-a76", "model", 1, 1)
    assert meta["version"].startswith("fxquant.latency_table/1; model on aarch64 cortex-a76")
    assert meta["estimate_ms"] == pytest.approx(sum(meta["layer_ms"].values()))
    assert set(meta["kernels"]) == set(plan.bits)
    assert data["metadata"]["budget"]["latency_ms"] == 1.0 and data["metadata"]["metric"] == "latency_ms"
    layers = data["metadata"]["layers"]
    for name, (wb, ab) in plan.bits.items():  # the per-layer rows travel with the plan
        assert layers[name]["latency"][f"w{wb}a{ab}"] == meta["layer_ms"][name]
    assert BitwidthPlan.load(tmp_path / "plan.json") == plan


class _ConstantBias(nn.Module):
    """A linear layer on the input plus a small MLP on a buffer (Swin v2's position-bias MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(1, 5, 5, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x) + self.mlp(self.table).view(25, 3)


def test_layers_on_build_time_constants_cost_nothing():
    """convert folds them while building (direct kernel), so the table prices them at 0 and as direct."""
    torch.manual_seed(0)
    x = torch.randn(2, 25, 8)
    config = fxquant.QuantConfig(weight_bits=2, act_bits=2, first_last_bits=None)
    gm = fxquant.prepare(_ConstantBias(), (x,), config)
    pairs = {name: [(2, 2), (4, 4)] for name in ("fc", "mlp.0", "mlp.2")}
    table = build_latency_table(gm, pairs, "host", "model", 1, 1, False)
    for name in ("mlp.0", "mlp.2"):
        assert set(table.latency_ms[name].values()) == {0.0}
        assert all(kernel.startswith("direct") for kernel in table.kernels[name].values())
    assert all(ms > 0 for ms in table.latency_ms["fc"].values())
