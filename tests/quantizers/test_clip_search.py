"""The clip-range search on large tensors: a strided sample of the errors picks (nearly) the full search's range,
the batched and bounded search picks exactly what measuring every candidate one by one picks, and ``prepare``
runs the model once."""

from __future__ import annotations

import pytest
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


def _one_by_one(x: torch.Tensor, bits: int, signed: bool, per_channel: bool, candidates: int = 32):
    """The search as it was written first: each candidate measured on its own, in order (the reference)."""
    sample, lo_max, hi_max = base.clip_search_bounds(x, signed, per_channel)  # the bounds are not what changed
    best_err, best = torch.full_like(hi_max, float("inf")), torch.ones_like(hi_max)
    n = 2**bits - 1
    for frac in torch.linspace(1.0 / candidates, 1.0, candidates):
        lo, hi = lo_max * frac, hi_max * frac
        lo_col, step = lo.unsqueeze(1), ((hi - lo) / n).unsqueeze(1)
        diff = torch.sub(sample, lo_col).div_(step).add_(0.5).floor_().clamp_(0, n)
        err = diff.mul_(step).add_(lo_col).sub_(sample).square_().mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, frac.expand_as(best), best)
    low, high = lo_max * best, hi_max * best
    return (low.reshape(()), high.reshape(())) if not per_channel else (low, high)


def _tensors():
    g = torch.Generator().manual_seed(0)
    yield "relu", torch.randn(1, 16, 64, 64, generator=g).relu(), False, False  # 65536 values: bounded first
    yield "shifted", torch.randn(100000, generator=g) * 3 + 1, False, False
    yield "signed", torch.randn(70000, generator=g), True, False
    yield "heavy tails", torch.randn(50000, generator=g) ** 3, False, False
    yield "on the levels", torch.randint(0, 4, (60000,), generator=g).float() / 3, False, False
    yield "constant", torch.full((40000,), 0.7), False, False
    yield "zeros", torch.zeros(40000), True, False
    yield "tiny", torch.randn(40000, generator=g) * 1e-30, False, False
    yield "huge", torch.randn(40000, generator=g) * 1e20, False, False
    yield "long rows", torch.randn(6, 40000, generator=g) * torch.linspace(0.1, 2, 6).unsqueeze(1), True, True
    yield "a zero row", torch.cat((torch.randn(1, 50000, generator=g), torch.zeros(1, 50000))), True, True
    yield "one row", torch.randn(1, 50000, generator=g), True, True
    yield "conv weight", torch.randn(64, 32, 3, 3, generator=g), True, True
    yield "sampled", torch.randn(300, 4000, generator=g), True, True
    yield "transposed", torch.randn(3000, 20, generator=g).t(), True, True


@pytest.mark.parametrize("threads", [1, 2])
def test_search_picks_what_one_by_one_picks(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one-row sums depend on the thread count: both must agree at each
    try:
        for name, x, signed, per_channel in _tensors():
            for bits in (1, 2, 3, 4, 8):
                got = search_clip_range(x, bits, signed=signed, per_channel=per_channel)
                want = _one_by_one(x, bits, signed, per_channel)
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (name, bits)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_errors_are_the_one_by_one_errors(threads: int) -> None:
    """Bit for bit: several candidates per pass, and rows gathered in any groups of two or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    try:
        for sample in (torch.randn(1, 100000, generator=g), torch.randn(1, 3000, generator=g),
                       torch.randn(5, 40000, generator=g), torch.randn(64, 288, generator=g)):
            rows = sample.shape[0]
            fracs = torch.linspace(1.0 / 32, 1.0, 32).unsqueeze(1)
            hi_max = sample.abs().amax(dim=1)
            lo = -hi_max * fracs
            step = (hi_max * fracs - lo) / 3
            want = torch.stack([base._quantize_error(sample, lo[c].unsqueeze(1), step[c].unsqueeze(1), 3).mean(dim=1)
                                for c in range(32)])
            assert torch.equal(base._measure_candidates(sample, lo, step, 3), want)
            if rows > 1:
                cand = torch.randint(0, 32, (7,), generator=g)
                row = torch.randint(0, rows, (7,), generator=g)
                for count in (1, 2, 7):  # one pair alone is measured with a second row
                    got = base._measure_rows(sample, lo[cand[:count], row[:count]], step[cand[:count], row[:count]],
                                             row[:count], 3)
                    assert torch.equal(got, want[cand[:count], row[:count]])
    finally:
        torch.set_num_threads(before)


def test_bounds_leave_few_candidates() -> None:
    """On a long row the bounds decide: only the candidates near the best are measured."""
    x = torch.randn(1, 200000, generator=torch.Generator().manual_seed(1))
    fracs = torch.linspace(1.0 / 32, 1.0, 32).unsqueeze(1)
    hi_max = x.amax(dim=1)
    lo_max = torch.minimum(x.amin(dim=1), torch.zeros_like(hi_max))
    lo = lo_max * fracs
    live = base._possible_winners(x, lo, (hi_max * fracs - lo) / 3, 3)
    assert live is not None and 1 <= int(live.sum()) <= 3


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
