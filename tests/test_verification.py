"""Comparing a candidate with the reference: exact agreement passes, any excess difference fails."""

from __future__ import annotations

import pytest
import torch

from fxquant.tools.verification import VerificationError, compare


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 3, generator=generator), torch.tensor([0, 1, 2, 0, 1])) for _ in range(2)]


def reference(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


def test_identical_models_agree_exactly() -> None:
    agreement = compare(reference, reference, batches())
    assert (agreement.samples, agreement.max_abs_diff, agreement.top1_agreement) == (10, 0.0, 1.0)
    assert agreement.candidate_accuracy == agreement.reference_accuracy
    agreement.check(atol=0.0, min_agreement=1.0)


def test_small_offset_passes_a_tolerance_that_covers_it_only() -> None:
    agreement = compare(reference, lambda x: reference(x) + 1e-3, batches())
    assert agreement.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    agreement.check(atol=2e-3, min_agreement=1.0)
    with pytest.raises(VerificationError, match=r"max abs diff 0.001 > atol 0.0001"):
        agreement.check(atol=1e-4, min_agreement=1.0)


def test_changed_predictions_fail() -> None:
    agreement = compare(reference, lambda x: -reference(x), batches())
    assert agreement.top1_agreement < 1.0
    with pytest.raises(VerificationError, match="top-1 agreement .* < 100.0000%"):
        agreement.check(atol=1e9, min_agreement=1.0)


def test_nan_output_fails_any_tolerance() -> None:
    agreement = compare(reference, lambda x: reference(x) * float("nan"), batches())
    assert agreement.max_abs_diff == float("inf")
    with pytest.raises(VerificationError):
        agreement.check(atol=1e30, min_agreement=0.0)
