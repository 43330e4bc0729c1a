import json
import random

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant import Budget, BudgetError, CheckpointError, ConfigError, SearchOptions
from fxquant.data.fashion_mnist import TensorBatches
from fxquant.layers import QuantLayer
from fxquant.passes.analysis.cost_model import LayerCost, layer_costs, plan_cost
from fxquant.passes.analysis.layer_graph import TiePolicy, tie_groups
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer, gumbel_sigmoid
from fxquant.sdq.rounding import round_to_budget, sensitivity_scales
from fxquant.sdq.search import fixed_bits
from fxquant.sdq.units import Unit, attach_dbps, expected_cost, layer_bits, search_units
from tests.passes.test_layer_graph import tiny_res

LAYERS = ["stem", "a", "b", "short", "c", "fc"]
FAST = SearchOptions(steps=4, interval=1)


def _data(batches: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(batches)]


def _example() -> tuple[torch.Tensor]:
    return (_data(1, seed=7)[0][0],)


def _independent_cost(model, plan: fxquant.BitwidthPlan, metric: str) -> float:
    """The plan's cost measured on the model prepared with it (not on the search's own numbers)."""
    qmodel = fxquant.prepare(model, _example(), fxquant.QuantConfig(quantizer="dsq", plan=plan))
    costs = layer_costs(qmodel)
    w = {n: qmodel.get_submodule(n).weight_quant.bits for n in costs}
    a = {n: qmodel.get_submodule(n).input_quant.bits for n in costs}
    assert (w, a) == ({n: b[0] for n, b in plan.bits.items()}, {n: b[1] for n, b in plan.bits.items()})
    return float(plan_cost(costs, metric, w, a))


# -- Budget -----------------------------------------------------------------------------------------------


def test_budget_needs_exactly_one_valid_bound():
    assert Budget(avg_weight_bits=3).metric == "avg_weight_bits"
    assert Budget(bitops=1e6).bound == 1e6
    with pytest.raises(ConfigError, match="exactly one"):
        Budget()
    with pytest.raises(ConfigError, match="exactly one"):
        Budget(avg_weight_bits=3.0, size_bytes=100)
    with pytest.raises(ConfigError, match="positive finite"):
        Budget(bitops=-1)
    with pytest.raises(ConfigError, match="positive finite"):
        Budget(size_bytes=float("nan"))
    with pytest.raises(ConfigError, match="min_bits=5 is above max_bits=4"):
        Budget(avg_weight_bits=3, min_bits=5, max_bits=4)
    with pytest.raises(ConfigError, match="set one"):
        Budget(avg_weight_bits=3, act_bits=4, search_act_bits=True)
    with pytest.raises(ConfigError, match="unknown Budget key"):
        Budget.from_dict({"avg_bits": 3})
    assert Budget.from_dict(Budget(bitops=5e5, min_bits=3).to_dict()) == Budget(bitops=5e5, min_bits=3)
    with pytest.raises(ConfigError, match="steps=0"):
        SearchOptions(steps=0)
    with pytest.raises(ConfigError, match="threshold"):
        SearchOptions(threshold=1.0)
    with pytest.raises(ConfigError, match="ties must be a TiePolicy"):
        SearchOptions(ties=True)


# -- the SDQ quantizer ------------------------------------------------------------------------------------


def test_gumbel_sigmoid_samples_bernoulli_of_the_logit():
    torch.manual_seed(3)
    logit = torch.tensor(0.8)
    draws = torch.stack([gumbel_sigmoid(logit, 1.0)[0] for _ in range(4000)]).float().mean()
    assert abs(float(draws) - float(torch.sigmoid(logit))) < 0.03
    hard, relaxed = gumbel_sigmoid(torch.tensor(0.0), 0.5, uniform=torch.tensor(0.9))
    assert bool(hard) and float(relaxed) == pytest.approx(1 / (1 + (1 / 9) ** 2))


def test_sdq_quantizer_outputs_one_of_two_adjacent_bitwidths_and_steps_down():
    torch.manual_seed(0)
    q = StochasticBitwidthQuantizer(4, "weight", channels=3, options={"min_bits": 2})
    w = torch.randn(3, 5)
    q.train()
    q(w)  # initialises the base range
    with torch.no_grad():
        high = q.base.soft_forward(w)
        q.base.bits = 3
        low = q.base.soft_forward(w)
        q.base.bits = 4
    seen = set()
    for u in (0.05, 0.95):  # logit 2: keep 4 bits unless the noise is very low
        q.noise = torch.tensor(u)
        out = q(w)
        seen.add("high" if torch.equal(out, high) else "low" if torch.equal(out, low) else "neither")
    assert seen == {"high", "low"}
    # the DBP's record of dL/dz: with L = Σ c·y, dL/dz = Σ c·(Q_4(w) − Q_3(w)), so the sensitivity is its negative
    c = torch.randn(3, 5)
    q.task_grad_sum.zero_()
    q.task_grad_count.zero_()
    for u in (0.05, 0.95):
        q.noise = torch.tensor(u)
        (q(w) * c).sum().backward()
    assert q.sensitivity() == pytest.approx(-float((c * (high - low)).sum()), rel=1e-5)
    assert float(q.logit.grad) != 0.0
    q.step_down()
    assert (q.bits, q.base.bits, float(q.logit.detach())) == (3, 3, 2.0) and not bool(q.initialized)
    assert q.sensitivity() is None
    q.step_down()
    assert q.bits == 2 and not q.stochastic
    with pytest.raises(ConfigError, match="min_bits=2"):
        q.step_down()


def test_sdq_is_a_registered_quantizer_whose_hard_form_converts_exactly():
    model = tiny_res()
    x = _example()[0]
    qmodel = fxquant.prepare(model, (x,), fxquant.QuantConfig(quantizer="sdq", weight_bits=3))
    assert isinstance(qmodel.get_submodule("a").weight_quant, StochasticBitwidthQuantizer)
    reference = fxquant.convert(qmodel, backend="torch")
    with torch.no_grad():
        assert torch.equal(qmodel.eval()(x), reference(x))
    with pytest.raises(ConfigError, match="base='sdq'"):
        fxquant.QuantConfig(quantizer="sdq", quantizer_options={"base": "sdq"})
    with pytest.raises(ConfigError, match="not options of 'dsq'"):
        fxquant.QuantConfig(quantizer="sdq", quantizer_options={"base_options": {"nope": 1}})


# -- DBPs -------------------------------------------------------------------------------------------------


def _sdq_prepared(budget: Budget, ties: TiePolicy | None = None):
    from fxquant.sdq.search import _sdq_config

    config = fxquant.QuantConfig(quantizer="dsq")
    gm = fxquant.prepare(tiny_res(), _example(), _sdq_config(config, budget, SearchOptions()))
    w, a = fixed_bits(gm, config, budget)
    units = search_units(tie_groups(gm, ties), w, a)
    attach_dbps(gm, units, budget.max_bits)
    return gm, units


def test_dbps_receive_gradients_from_the_task_and_from_the_cost():
    budget = Budget(bitops=1e4, search_act_bits=True)
    gm, units = _sdq_prepared(budget)
    searched = [u for u in units if u.searched]
    assert {u.key for u in searched} == {"w:a", "w:b", "w:short", "w:c", "a:a", "a:b", "a:c"}
    costs = layer_costs(gm)
    x, y = _data(1)[0]
    gm.train()
    task = F.cross_entropy(gm(x), y)
    task.backward()
    task_grads = {u.key: gm.get_submodule(f"{u.members[0]}.{'weight_quant' if u.role == 'weight' else 'input_quant'}")
                  .logit.grad for u in searched}
    assert all(g is not None and float(g) != 0.0 for g in task_grads.values()), task_grads
    gm.zero_grad()
    expected_cost(gm, units, costs, "bitops").backward()
    for u in searched:
        q = gm.get_submodule(f"{u.members[0]}.{'weight_quant' if u.role == 'weight' else 'input_quant'}")
        # d E[bitops] / d θ = σ'(θ) · Σ_members MACs · E[other bits] > 0: the cost pushes every DBP down
        assert float(q.logit.grad) > 0
    fixed = gm.get_submodule("stem.weight_quant")
    assert fixed.logit.grad is None and not fixed.stochastic


def test_tied_layers_share_one_dbp():
    gm, units = _sdq_prepared(Budget(bitops=1e4, search_act_bits=True), TiePolicy(merge_weights=True))
    assert gm.get_submodule("a.input_quant").logit is gm.get_submodule("short.input_quant").logit
    assert gm.get_submodule("b.weight_quant").logit is gm.get_submodule("short.weight_quant").logit
    assert gm.get_submodule("a.weight_quant").logit is not gm.get_submodule("b.weight_quant").logit
    node = next(n for n in gm.graph.nodes if n.target == "short")
    assert node.meta["fxquant.sdq"] == {"weight": "w:b", "activation": "a:a"}


# -- rounding ---------------------------------------------------------------------------------------------


def _random_units(rng: random.Random) -> tuple[list[Unit], dict[str, LayerCost]]:
    names = [f"l{i}" for i in range(rng.randint(3, 7))]
    costs = {n: LayerCost(n, "Conv2d", rng.randint(100, 5000), rng.randint(10, 3000), rng.randint(8, 64))
             for n in names}
    units, rest = [], names[1:-1]
    units.append(Unit("w:first", "weight", (names[0],), 8))
    units.append(Unit("w:last", "weight", (names[-1],), 8))
    while rest:  # random weight tie groups
        k = rng.randint(1, min(3, len(rest)))
        units.append(Unit(f"w:{rest[0]}", "weight", tuple(rest[:k])))
        rest = rest[k:]
    for n in names:
        units.append(Unit(f"a:{n}", "activation", (n,), rng.choice([4, 8]) if n in (names[0], names[-1]) else None))
    return units, costs


def test_rounding_meets_random_budgets_and_respects_ties_floor_and_fixed_bits():
    rng = random.Random(0)
    for case in range(60):
        units, costs = _random_units(rng)
        metric = rng.choice(["avg_weight_bits", "bitops", "size_bytes"])
        lo_bits, hi_bits = rng.choice([(1, 8), (2, 8), (2, 6), (3, 4)])
        probe = Budget(bitops=1.0, min_bits=lo_bits, max_bits=hi_bits)
        floor = {u.key: u.fixed_bits or lo_bits for u in units}
        ceil = {u.key: u.fixed_bits or hi_bits for u in units}
        lowest = float(plan_cost(costs, metric, *layer_bits(units, floor)))
        highest = float(plan_cost(costs, metric, *layer_bits(units, ceil)))
        target = lowest + rng.random() * (highest - lowest)
        budget = Budget(**{metric: target}, min_bits=probe.min_bits, max_bits=probe.max_bits)
        bits = {u.key: u.fixed_bits or rng.randint(lo_bits, hi_bits) for u in units}
        sens = {u.key: {b: rng.random() for b in range(bits[u.key], hi_bits + 1)} for u in units if u.searched}
        out = round_to_budget(units, bits, sens, costs, budget)
        w, a = layer_bits(units, out)
        cost = float(plan_cost(costs, metric, w, a))
        assert cost <= target * (1 + 1e-9), (case, metric, cost, target)
        for u in units:
            if u.searched:
                assert lo_bits <= out[u.key] <= hi_bits
            else:
                assert out[u.key] == u.fixed_bits
            assert len({w[m] if u.role == "weight" else a[m] for m in u.members}) == 1
        # filling is greedy to the end: no searched unit can still go up by one bit within the budget
        for u in units:
            if u.searched and out[u.key] < hi_bits:
                trial = float(plan_cost(costs, metric, *layer_bits(units, {**out, u.key: out[u.key] + 1})))
                assert trial > target * (1 + 1e-9)


def test_sensitivity_scales_fit_the_noise_power_model_with_a_relative_floor():
    exact = {k: 0.5 * 4.0 ** (-k) for k in (6, 5, 4)}  # measurements that follow s(k) = A·4^-k with A = 0.5
    noisy = {3: 0.02, 4: -0.001}
    scales = sensitivity_scales({"w:x": exact, "w:y": noisy, "w:z": {5: -0.3}, "w:q": {4: 0.1 * 4.0**-4}},
                                ["w:x", "w:y", "w:z", "w:q", "w:none"])
    assert scales["w:x"] == pytest.approx(0.5)
    want_y = (0.02 * 4.0**-3 - 0.001 * 4.0**-4) / (4.0**-6 + 4.0**-8)
    assert scales["w:y"] == pytest.approx(want_y)
    assert scales["w:q"] == pytest.approx(0.1)
    median = sorted([0.5, want_y, 0.1])[1]
    assert scales["w:z"] == scales["w:none"] == pytest.approx(0.01 * median)
    assert sensitivity_scales({"w:z": {5: -0.3}}, ["w:z", "w:none"]) == {"w:z": 1.0, "w:none": 1.0}


def test_rounding_lowers_the_least_sensitive_bits_per_unit_of_cost_first():
    costs = {n: LayerCost(n, "Conv2d", 1000, p, 0) for n, p in (("x", 100), ("y", 100), ("z", 400))}
    units = [Unit(f"w:{n}", "weight", (n,)) for n in costs] + [Unit(f"a:{n}", "activation", (n,), 4) for n in costs]
    bits = {"w:x": 4, "w:y": 4, "w:z": 4, "a:x": 4, "a:y": 4, "a:z": 4}
    # one bit off must go: x saves 100/600 avg-bit units at sensitivity 0.2, z saves 400/600 at 0.6
    budget = Budget(avg_weight_bits=3.5, min_bits=2, max_bits=4)
    sens = {"w:x": {4: 0.2}, "w:y": {4: 0.9}, "w:z": {4: 0.6}}
    out = round_to_budget(units, bits, sens, costs, budget, fill=False)
    assert (out["w:x"], out["w:y"], out["w:z"]) == (4, 4, 3)  # 0.6/400 < 0.2/100
    out = round_to_budget(units, bits, {"w:x": {4: 0.1}, "w:y": {4: 0.9}, "w:z": {4: 0.6}}, costs, budget, fill=False)
    # x first (0.1/100 < 0.6/400); then z, since x's unexplored second step is extrapolated to 4 x 0.1 (0.4/100)
    assert (out["w:x"], out["w:y"], out["w:z"]) == (3, 4, 3)
    # filling raises z from 2 back to 3 (3.33 avg bits); 4 would overshoot; x and y are at max_bits
    filled = round_to_budget(units, {**bits, "w:z": 2}, {"w:z": {4: 0.3, 3: 0.2}}, costs, budget, fill=True)
    assert (filled["w:x"], filled["w:y"], filled["w:z"]) == (4, 4, 3)
    unfilled = round_to_budget(units, {**bits, "w:z": 2}, {"w:z": {4: 0.3, 3: 0.2}}, costs, budget, fill=False)
    assert unfilled["w:z"] == 2


# -- the search -------------------------------------------------------------------------------------------


def test_search_meets_random_budgets():
    model = tiny_res()
    data = _data()
    rng = random.Random(5)
    qmodel = fxquant.prepare(model, _example(), fxquant.QuantConfig(quantizer="dsq"))
    costs = layer_costs(qmodel)  # measured on a plain DSQ model, not on the search's own numbers

    def cost(metric: str, bits: dict[str, tuple[int, int]]) -> float:
        return float(plan_cost(costs, metric, {n: b[0] for n, b in bits.items()}, {n: b[1] for n, b in bits.items()}))

    lowest_bits = {n: (8, 8) if n in ("stem", "fc") else (2, 4) for n in LAYERS}
    highest_bits = {n: (8, 8) if n in ("stem", "fc") else (8, 4) for n in LAYERS}
    for metric in ("avg_weight_bits", "bitops", "size_bytes", "avg_weight_bits"):
        lowest, highest = cost(metric, lowest_bits), cost(metric, highest_bits)
        target = lowest + rng.uniform(0.05, 0.9) * (highest - lowest)
        plan = fxquant.search(model, _example(), data, Budget(**{metric: target}, act_bits=4), options=FAST,
                              progress=False)
        assert set(plan.bits) == set(LAYERS)
        assert plan.bits["stem"] == (8, 8) and plan.bits["fc"] == (8, 8)
        assert all(plan.bits[n][1] == 4 and 2 <= plan.bits[n][0] <= 8 for n in LAYERS if n not in ("stem", "fc"))
        assert cost(metric, plan.bits) <= target * (1 + 1e-9)
        assert plan.metadata["achieved"] == pytest.approx(cost(metric, plan.bits))


def test_infeasible_budget_fails_before_any_training():
    class NoData:
        def __iter__(self):
            raise AssertionError("the search must not train on an infeasible budget")

    costs = {"stem": 36, "a": 288, "b": 576, "short": 32, "c": 576, "fc": 32}
    lowest = (8 * (36 + 32) + 2 * (288 + 576 + 32 + 576)) / sum(costs.values())  # first/last at 8, rest at 2
    with pytest.raises(BudgetError, match=f"minimum achievable avg_weight_bits is {lowest:.6g}"):
        fxquant.search(tiny_res(), _example(), NoData(), Budget(avg_weight_bits=lowest - 0.01), progress=False)
    with pytest.raises(BudgetError, match="min_bits=3"):
        fxquant.search(tiny_res(), _example(), NoData(), Budget(avg_weight_bits=3.0, min_bits=3), progress=False)


def test_plan_json_round_trip_and_application(tmp_path):
    model = tiny_res()
    plan = fxquant.search(model, _example(), _data(), Budget(avg_weight_bits=4.0), options=FAST, progress=False)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "fxquant.bitwidth_plan/1" and data["bits"]["stem"] == [8, 8]
    loaded = fxquant.BitwidthPlan.load(path)
    assert loaded == plan
    qmodel = fxquant.prepare(model, _example(), fxquant.QuantConfig(quantizer="dsq", plan=loaded))
    applied = {n: (m.weight_quant.bits, m.input_quant.bits) for n, m in qmodel.named_modules()
               if isinstance(m, QuantLayer)}
    assert applied == dict(plan.bits)
    assert fxquant.QuantConfig.from_dict(fxquant.QuantConfig(plan=loaded).to_dict()).plan == plan


def test_tied_layers_get_equal_bits():
    model = tiny_res()
    options = SearchOptions(steps=4, interval=1, ties=TiePolicy(merge_weights=True))
    for target in (4e5, 8e5):  # all middle layers at W2A2 give 2.4e5 BitOPs, at W8A8 1.7e6
        plan = fxquant.search(model, _example(), _data(), Budget(bitops=target, search_act_bits=True),
                              options=options, progress=False)
        assert plan.bits["b"][0] == plan.bits["short"][0]
        assert plan.bits["a"][1] == plan.bits["short"][1]
        assert plan.metadata["ties"] == {"weight": [["b", "short"]], "activation": [["a", "short"]]}
        assert _independent_cost(model, plan, "bitops") <= target


def test_config_overrides_fix_bits_and_excluded_layers_are_outside_the_plan():
    config = fxquant.QuantConfig(overrides={"c": fxquant.LayerOverride(weight_bits=6)}, exclude=("short",))
    plan = fxquant.search(tiny_res(), _example(), _data(), Budget(avg_weight_bits=4.5), config=config,
                          options=FAST, progress=False)
    assert "short" not in plan.bits and plan.bits["c"][0] == 6
    assert "c" not in plan.metadata["searched"]["weight"]


def test_nothing_to_search_returns_the_config_without_training():
    class NoData:
        def __iter__(self):
            raise AssertionError("nothing is searched, so nothing should train")

    config = fxquant.QuantConfig(overrides={"type:Conv2d": fxquant.LayerOverride(weight_bits=3)})
    plan = fxquant.search(tiny_res(), _example(), NoData(), Budget(avg_weight_bits=4.0), config=config,
                          progress=False)
    assert plan.bits == {"stem": (3, 8), "a": (3, 4), "b": (3, 4), "short": (3, 4), "c": (3, 4), "fc": (8, 8)}


def test_resume_gives_the_same_plan_as_an_uninterrupted_run(tmp_path):
    model = tiny_res()
    g = torch.Generator().manual_seed(4)
    images, labels = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 4, (20,), generator=g)
    options = SearchOptions(steps=9, interval=2, checkpoint_every=2, seed=3)
    budget = Budget(avg_weight_bits=3.5)

    def loader():  # shuffled each epoch from its own generator: the resume must replay it
        return TensorBatches(images, labels, batch_size=8, shuffle=True, seed=11)

    full = fxquant.search(model, _example(), loader(), budget, options=options, progress=False,
                          checkpoint_path=tmp_path / "full.ckpt")

    class Interrupt(Exception):
        pass

    def crash(step, info):
        if step == 6:  # the 7th step; the last checkpoint was saved after 6 steps
            raise Interrupt

    path = tmp_path / "part.ckpt"
    with pytest.raises(Interrupt):
        fxquant.search(model, _example(), loader(), budget, options=options, progress=False,
                       checkpoint_path=path, on_step=crash)
    assert torch.load(path, weights_only=True)["step"] == 6
    resumed_steps = []
    resumed = fxquant.search(model, _example(), loader(), budget, options=options, progress=False,
                             checkpoint_path=path, on_step=lambda step, info: resumed_steps.append(step))
    assert resumed_steps == [6, 7, 8]
    assert resumed.bits == full.bits
    assert resumed.metadata["sensitivity"] == full.metadata["sensitivity"]
    assert resumed.metadata["search_bits"] == full.metadata["search_bits"]
    with pytest.raises(CheckpointError, match="budget"):
        fxquant.search(model, _example(), loader(), Budget(avg_weight_bits=4.0), options=options,
                       progress=False, checkpoint_path=path)


def test_report_table_and_chart(tmp_path, capsys):
    plan = fxquant.search(tiny_res(), _example(), _data(), Budget(avg_weight_bits=4.0), options=FAST,
                          progress=False)
    png = tmp_path / "plan.png"
    text = plan.report(png)
    assert capsys.readouterr().out.strip() == text.strip()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = plan.metadata["layers"]
    for name, (wb, ab) in plan.bits.items():
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert f"{layers[name]['macs'] * wb * ab / 1e6:.2f}" in row.split()
    total = sum(layers[n]["macs"] * wb * ab for n, (wb, ab) in plan.bits.items()) / 1e6
    assert f"{total:.2f}" in next(line for line in text.splitlines() if line.startswith("total")).split()
    assert f"achieved {plan.metadata['achieved']:.6g}" in text
    assert fxquant.search_report(plan, quiet=True) == text
    assert capsys.readouterr().out == ""


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_weights_writes_the_searchs_training_into_the_model():
    model = tiny_res()
    before = _state(model)
    budget = Budget(avg_weight_bits=4.0)
    plan = fxquant.search(model, _example(), _data(), budget, options=FAST, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # default: untouched

    trained = fxquant.search(model, _example(), _data(), budget, options=FAST, progress=False, update_weights=True)
    assert trained == plan  # writing back does not change the search
    after = model.state_dict()
    assert list(after) == list(before)  # no quantizer or DBP state leaks into the float model
    for name in ("stem.weight", "a.weight", "fc.weight", "bna.weight", "bna.running_mean", "bnb.running_var"):
        assert not torch.equal(after[name], before[name]), name
    for name in ("bn0", "bna", "bnb", "bns"):  # the batch norms saw exactly the search's training steps
        assert int(after[f"{name}.num_batches_tracked"]) == int(before[f"{name}.num_batches_tracked"]) + FAST.steps
    assert all(torch.isfinite(v).all() for v in after.values())
    # the search's first step starts from the model's weights: they moved by SGD steps, not to new values
    drift = (after["b.weight"] - before["b.weight"]).norm() / before["b.weight"].norm()
    assert 0 < float(drift) < 0.2


def test_update_weights_leaves_the_model_alone_when_the_search_fails():
    class Failing:
        def __init__(self):
            self.batches = _data()

        def __iter__(self):
            yield self.batches[0]
            yield self.batches[1]
            raise RuntimeError("loader died")

    model = tiny_res()
    before = _state(model)
    with pytest.raises(RuntimeError, match="loader died"):
        fxquant.search(model, _example(), Failing(), Budget(avg_weight_bits=4.0), options=FAST, progress=False,
                       update_weights=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_update_weights_refuses_inference_folding_before_training():
    class NoData:
        def __iter__(self):
            raise AssertionError("must fail before training")

    config = fxquant.QuantConfig(quantizer="dsq", fold_bn="inference")
    with pytest.raises(ConfigError, match=r"cannot write the trained weights back.*stem\.layer\.weight.*fold_bn='qat'"):
        fxquant.search(tiny_res().eval(), _example(), NoData(), Budget(avg_weight_bits=4.0), config, FAST,
                       progress=False, update_weights=True)
    with pytest.raises(ConfigError, match="update_weights must be True or False"):
        fxquant.search(tiny_res(), _example(), NoData(), Budget(avg_weight_bits=4.0), options=FAST, progress=False,
                       update_weights="yes")


def test_update_weights_on_a_traced_model():
    from fxquant.passes import trace

    model = trace(tiny_res())  # a GraphModule: the passes rewrite the copy's module tree in place
    before = _state(model)
    fxquant.search(model, _example(), _data(), Budget(avg_weight_bits=4.0), options=FAST, progress=False,
                   update_weights=True)
    after = model.state_dict()
    assert list(after) == list(before)
    assert int(after["bnb.num_batches_tracked"]) == int(before["bnb.num_batches_tracked"]) + FAST.steps
    assert not torch.equal(after["c.weight"], before["c.weight"])
