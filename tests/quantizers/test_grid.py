"""QuantGrid helpers: per-channel thresholds, codebook lookups and their 8-bit requantization."""

from __future__ import annotations

import pytest
import torch

from fxquant.quantizers.grid import QuantGrid, level_codes, requantize_levels, threshold_codes, uniform_codes


def test_uniform_encodings_are_unchanged():
    s = torch.tensor(0.5)
    for encoding, low in (("bipolar", -1.5), ("signed", -1.0), ("unsigned", 0.0)):
        grid = QuantGrid(2, encoding, s, torch.zeros(()))
        assert float(grid.low) == low
        x = torch.linspace(-3, 3, 50)
        assert torch.equal(grid.codes(x), uniform_codes(x, grid.low, grid.step, 2))


def test_per_channel_thresholds_count_comparisons_per_row():
    th = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.5, 2.0]])
    x = torch.tensor([[-2.0, -1.0, 0.5, 1.0, 3.0], [-1.0, 0.0, 0.4, 1.9, 2.0]])
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.0], [0.0, 1.0, 1.0, 2.0, 3.0]])
    assert torch.equal(threshold_codes(x, th), expected)
    assert torch.equal(threshold_codes(x[0], th[0]), expected[0])
    grid = QuantGrid(2, "bipolar", torch.ones(2), torch.zeros(2), thresholds=th)
    assert torch.equal(grid.codes(x), expected)


def test_requantize_levels_unsigned_and_signed_tables():
    levels = torch.tensor([0.0, 0.1, 0.35, 1.2])
    ints, scale = requantize_levels(levels)
    assert float(scale) == pytest.approx(1.2 / 255)
    assert ints.tolist() == [0, round(0.1 / (1.2 / 255)), round(0.35 / (1.2 / 255)), 255]
    signed = torch.tensor([[-2.0, -0.5, 0.0, 0.7, 2.0], [-1.0, -0.2, 0.0, 0.2, 1.0]])
    ints, scale = requantize_levels(signed)
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127, 1.0 / 127]))
    assert ints[:, 0].tolist() == [-127, -127] and ints[:, 2].tolist() == [0, 0]
    assert (ints.float() * scale[:, None] - signed).abs().max() <= scale.max() / 2 + 1e-7


def test_codebook_grid_values_and_lookup():
    levels = torch.tensor([[-1.0, 0.0, 0.3, 1.0], [-2.0, -1.0, 0.5, 2.0]])
    ints, scale = requantize_levels(levels)
    grid = QuantGrid(2, "codebook", scale, torch.zeros(2), levels, levels_int=ints)
    codes = torch.tensor([[0.0, 3.0, 2.0], [1.0, 2.0, 0.0]])
    assert torch.equal(grid.dequantize(codes), torch.tensor([[-1.0, 1.0, 0.3], [-1.0, 0.5, -2.0]]))
    assert torch.equal(grid.int_values(codes), torch.gather(ints, 1, codes.long()))
    torch.testing.assert_close(grid.step, scale)
    assert not grid.uniform


def test_level_codes_recover_the_codes_of_levels():
    levels = torch.tensor([0.0, 0.01, 0.3, 0.31, 2.0])
    codes = torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    assert torch.equal(level_codes(levels[codes.long()], levels), codes)
