"""Shared checks for the quantizer tests: the end-to-end freeze contract and the config errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig
from fxquant.integer import IntegerLayer

__all__ = ["prepare_and_train", "assert_frozen_matches_prepared", "assert_unknown_option_rejected", "reference_round"]


def reference_round(v: float) -> float:
    """Round half up, written out (the integer reference's tie rule)."""
    import math

    return float(math.floor(v + 0.5))


def prepare_and_train(
    model: nn.Module,
    scheme: str,
    bits: int,
    steps: int = 3,
    options: dict[str, Any] | None = None,
    perturb: Callable[[nn.Module], None] | None = None,
    first_last_bits: int | None = 8,
) -> tuple[nn.Module, torch.Tensor]:
    """Prepare ``model`` at W``bits``A``bits``, take a few SGD steps (so learned parameters move) and return it."""
    x = torch.randn(8, 3, 12, 12)
    config = QuantConfig(
        quantizer=scheme, weight_bits=bits, act_bits=bits, quantizer_options=options or {},
        first_last_bits=first_last_bits,
    )
    q = fxquant.prepare(model, (x,), config)
    if perturb is not None:
        perturb(q)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    target = torch.randn(8, 5)
    for step in range(steps):
        fxquant.update_schedules(q, step / max(steps - 1, 1))
        loss = (q(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval(), torch.randn(8, 3, 12, 12)


def assert_frozen_matches_prepared(q: nn.Module, x: torch.Tensor) -> dict[str, IntegerLayer]:
    """``convert(backend="torch")`` gives exactly the prepared model's eval output (the freeze contract)."""
    with torch.no_grad():
        expected = q(x)
        ref = fxquant.convert(q, backend="torch")
        got = ref(x)
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected), f"max |diff| {float((got - expected).abs().max())}"
    # the output depends on the input (a collapsed network would pass trivially)
    assert not torch.equal(expected[0], expected[1])
    return {n: m for n, m in ref.named_modules() if isinstance(m, IntegerLayer)}


def assert_unknown_option_rejected(scheme: str, allowed: set[str]) -> None:
    with pytest.raises(fxquant.ConfigError) as info:
        QuantConfig(quantizer=scheme, quantizer_options={"no_such_option": 1})
    message = str(info.value)
    assert "no_such_option" in message
    for name in allowed:
        assert name in message
    from fxquant.quantizers import get_quantizer

    assert set(get_quantizer(scheme).OPTIONS) == allowed
