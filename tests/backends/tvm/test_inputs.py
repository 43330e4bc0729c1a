"""Calling a compiled ``tvm-llvm`` module with the wrong input fails with ``InputError`` naming both shapes."""

from __future__ import annotations

import pytest
import torch

import fxquant
from tests.backends.tvm.helpers import ResidualNet, quantized


@pytest.fixture(scope="module")
def compiled() -> fxquant.backends.tvm.TvmModule:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    return fxquant.convert(quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2), backend="tvm-llvm")


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(1, 3, 16, 16), r"expected shape \(2, 3, 16, 16\) float32, got \(1, 3, 16, 16\) float32"),
        (torch.randn(2, 3, 17, 16), r"got \(2, 3, 17, 16\)"),
        (torch.randn(2, 3, 16, 16, dtype=torch.float64), r"expected shape \(2, 3, 16, 16\) float32, got .* float64"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.int32), "int32"),
    ],
)
def test_wrong_input_raises_input_error(compiled, x: torch.Tensor, message: str) -> None:
    with pytest.raises(fxquant.InputError, match=message):
        compiled(x)


def test_wrong_number_or_kind_of_inputs(compiled) -> None:
    with pytest.raises(fxquant.InputError, match="expected 1 input tensor"):
        compiled(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))
    with pytest.raises(fxquant.InputError, match="expected a torch.Tensor, got ndarray"):
        compiled(torch.randn(2, 3, 16, 16).numpy())


def test_accumulators_need_the_debug_option(compiled) -> None:
    with pytest.raises(fxquant.BackendError, match="debug_accumulators=True"):
        compiled.run_with_accumulators(torch.randn(2, 3, 16, 16))


def test_right_input_runs_and_is_deterministic(compiled) -> None:
    x = torch.randn(2, 3, 16, 16)
    first, second = compiled(x), compiled(x)
    assert first.shape == (2, 10) and first.dtype == torch.float32
    assert torch.equal(first, second)
