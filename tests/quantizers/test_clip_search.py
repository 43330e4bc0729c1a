"""The clip-range search on large tensors: a strided sample of the errors picks (nearly) the full search's range,
and ``prepare`` runs the model once."""

from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.quantizers import base
from fxquant.quantizers.base import search_clip_range


def test_sampled_search_matches_full_search(monkeypatch) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 40000) * torch.linspace(0.1, 2.0, 64).unsqueeze(1)  # 2.56M values: sampled
    assert w.numel() > base.CLIP_SEARCH_ELEMENTS
    low, high = search_clip_range(w, 2, signed=True, per_channel=True)
    monkeypatch.setattr(base, "CLIP_SEARCH_ELEMENTS", w.numel())
    full_low, full_high = search_clip_range(w, 2, signed=True, per_channel=True)
    peak = w.abs().amax(dim=1)
    # the same candidate, or its neighbour (candidates are 1/32 of the channel's peak apart)
    assert torch.all((high - full_high).abs() <= peak / 32 + 1e-6)
    assert torch.equal(low, -high) and torch.equal(full_low, -full_high)


def test_small_tensors_are_searched_whole() -> None:
    x = torch.randn(3, 1000)
    assert base._error_sample(x) is x


class Counting(nn.Module):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return x


def test_prepare_runs_the_model_once() -> None:
    model = nn.Sequential(nn.Linear(8, 8), Counting(), nn.Linear(8, 4))
    Counting.calls = 0
    qmodel = fxquant.prepare(model, (torch.randn(2, 8),), fxquant.QuantConfig(weight_bits=4, act_bits=4,
                                                                                leaf_modules=["1"]))
    assert Counting.calls == 1  # one pass initialises the quantizers and records the shapes
    assert all(bool(q.initialized) for q in fxquant.quantizers_of(qmodel).values())
    assert all("tensor_meta" in n.meta for n in qmodel.graph.nodes if n.op != "output")
