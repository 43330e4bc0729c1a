"""Per-layer inspection: the numbers follow the bits, the table and the chart show every layer."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import FxQuantError
from fxquant.tools.inspection import format_table, layer_rows, plot_rows
from tests.conftest import TinyNet, calibrate_bn


@pytest.fixture(scope="module")
def model() -> TinyNet:
    torch.manual_seed(0)
    return calibrate_bn(TinyNet(), (8, 3, 12, 12))


def rows_at(model: TinyNet, bits: int) -> dict:
    config = fxquant.QuantConfig(weight_bits=bits, act_bits=bits, first_last_bits=None)
    qmodel = fxquant.prepare(model, (torch.randn(8, 3, 12, 12),), config)
    return {r.name: r for r in layer_rows(qmodel)}


def test_sqnr_grows_with_bits_and_ranges_are_consistent(model) -> None:
    low, high = rows_at(model, 2), rows_at(model, 6)
    assert list(low) == ["conv1", "conv2", "dw", "fc"]
    for name in low:
        assert (low[name].weight_bits, high[name].act_bits) == (2, 6)
        assert high[name].weight_sqnr_db > low[name].weight_sqnr_db + 6.0  # several dB per extra bit
        assert 0 < high[name].weight_scale_min <= high[name].weight_scale_max < low[name].weight_scale_max
        assert low[name].act_low < low[name].act_high
        assert low[name].scheme == "dsq"
    assert low["conv1"].type == "Conv2d" and low["fc"].type == "Linear"


def test_table_and_png(model) -> None:
    rows = list(rows_at(model, 4).values())
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["layer", "type", "scheme"]
    assert set(table[1]) == {"-", " "}
    assert [line.split()[0] for line in table[2:]] == [r.name for r in rows]
    assert plot_rows(rows)[:8] == b"\x89PNG\r\n\x1a\n"


def test_uncalibrated_model_is_refused(model) -> None:
    with pytest.raises(FxQuantError, match="quantizers are not calibrated yet"):
        layer_rows(fxquant.prepare(model, None, fxquant.QuantConfig()))
