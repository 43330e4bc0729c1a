import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.passes.analysis.layer_graph import TIES_META, TiePolicy, first_last_layers, layer_graph, tie_groups
from fxquant.passes.trace import trace
from tests.conftest import calibrate_bn


class TinyRes(nn.Module):
    """stem -> residual block with a projection shortcut -> conv -> linear head (8x8 inputs, 4 classes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(4, 8, 1, stride=2, bias=False)
        self.bns = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bna(self.a(x)))
        y = F.relu(self.bnb(self.b(y)) + self.bns(self.short(x)))
        y = F.relu(self.c(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def tiny_res() -> nn.Module:
    return calibrate_bn(TinyRes(), (8, 1, 8, 8))


def _prepared():
    return fxquant.prepare(tiny_res(), (torch.randn(4, 1, 8, 8),), fxquant.QuantConfig(quantizer="dsq"))


def test_edges_follow_data_through_non_parametric_ops():
    gm = _prepared()
    before = [(n.op, n.target) for n in gm.graph.nodes]
    g = layer_graph(gm)
    assert list(g.nodes) == ["stem", "a", "b", "short", "c", "fc"]
    assert set(g.edges) == {("stem", "a"), ("stem", "short"), ("a", "b"), ("b", "c"), ("short", "c"), ("c", "fc")}
    assert [n for n in g.nodes if g.nodes[n]["first"]] == ["stem"]
    assert [n for n in g.nodes if g.nodes[n]["last"]] == ["fc"]
    assert g.nodes["fc"]["type"] == "Linear" and g.nodes["b"]["type"] == "Conv2d"
    # an analysis: the graph itself is unchanged
    gm.graph.lint()
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_traced_and_prepared_graphs_give_the_same_layer_graph():
    prepared = layer_graph(_prepared())
    traced = layer_graph(trace(tiny_res()))
    assert set(traced.edges) == set(prepared.edges)
    assert list(traced.nodes) == list(prepared.nodes)


def test_default_ties_share_activation_bits_of_a_shared_input_only():
    gm = _prepared()
    ties = tie_groups(gm)
    assert ties.activation == (("stem",), ("a", "short"), ("b",), ("c",), ("fc",))
    assert all(len(g) == 1 for g in ties.weight)
    meta = {n.target: n.meta[TIES_META] for n in gm.graph.nodes if TIES_META in n.meta}
    assert meta["short"] == {"weight": ("short",), "activation": ("a", "short")}
    assert set(meta) == {"stem", "a", "short", "b", "c", "fc"}


def test_merge_ties_are_opt_in():
    gm = _prepared()
    ties = tie_groups(gm, TiePolicy(shared_input_acts=False, merge_weights=True))
    assert ties.group_of("weight", "b") == ("b", "short")
    assert ties.group_of("weight", "short") == ("b", "short")
    assert ties.group_of("weight", "c") == ("c",)
    assert all(len(g) == 1 for g in ties.activation)


def test_identity_shortcut_ties_the_layer_that_produced_the_block_input():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 1)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            x = F.relu(self.stem(x))
            y = self.conv2(F.relu(self.conv1(x)))
            return self.head(torch.cat([F.relu(y + x), x], dim=1)[:, :4])

    gm = fxquant.prepare(Block(), (torch.randn(2, 2, 6, 6),))
    g = layer_graph(gm)
    assert set(g.edges) == {("stem", "conv1"), ("conv1", "conv2"), ("conv2", "head"), ("stem", "head")}
    ties = tie_groups(gm, TiePolicy(merge_weights=True))
    # add(conv2, relu(stem)) ties conv2 and stem; cat(relu(add), relu(stem)) stops at the add, adding stem only
    assert ties.group_of("weight", "conv2") == ("stem", "conv2")
    assert ties.group_of("weight", "head") == ("head",)


class ResidualStreamTwoHeads(nn.Module):
    """A residual stream fed by the input (as in a transformer) and two output heads."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x):
        h = x + self.fc1(x)
        h = h + F.relu(self.fc2(h))
        return self.head_a(h), self.head_b(h)


def test_first_last_layers_ignore_the_residual_stream_and_keep_every_head():
    model = ResidualStreamTwoHeads()
    assert first_last_layers(trace(model)) == {"fc1", "head_a", "head_b"}  # fc2 reads fc1's output: not first
    q = fxquant.prepare(model, (torch.randn(4, 8),), fxquant.QuantConfig(weight_bits=2, act_bits=2))
    bits = {n: m.weight_quant.bits for n, m in q.named_modules() if n in {"fc1", "fc2", "head_a", "head_b"}}
    assert bits == {"fc1": 8, "fc2": 2, "head_a": 8, "head_b": 8}  # first_last_bits=8 on the same definition
    g = layer_graph(q)
    assert {n for n in g.nodes if g.nodes[n]["first"] or g.nodes[n]["last"]} == {"fc1", "head_a", "head_b"}
