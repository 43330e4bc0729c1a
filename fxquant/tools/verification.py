"""Compare a deployed model with the integer reference on real data: the numbers ``fxquant verify`` checks.

The numerics contract: integer accumulators match exactly, outputs agree to float32 rounding, and top-1
predictions agree on every input. :func:`compare` measures; :meth:`Agreement.check` enforces tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fxquant.errors import FxQuantError

__all__ = ["Agreement", "VerificationError", "compare"]

Model = Callable[[torch.Tensor], torch.Tensor]


class VerificationError(FxQuantError):
    """A converted model does not agree with the reference within the tolerances."""


@dataclass(frozen=True)
class Agreement:
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # fraction of samples whose arg-max agrees
    reference_accuracy: float  # top-1 accuracy in percent, against the labels
    candidate_accuracy: float

    def check(self, atol: float, min_agreement: float) -> None:
        """Raise :class:`VerificationError` when outputs differ by more than ``atol`` or predictions disagree."""
        problems = []
        if self.max_abs_diff > atol:
            problems.append(f"max abs diff {self.max_abs_diff:.3g} > atol {atol:.3g}")
        if self.top1_agreement < min_agreement:
            problems.append(f"top-1 agreement {self.top1_agreement:.4%} < {min_agreement:.4%}")
        if problems:
            raise VerificationError(f"outputs disagree on {self.samples} samples: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def compare(reference: Model, candidate: Model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Agreement:
    """Run both models on every batch and summarise how far apart they are.

    Example::

        agreement = compare(fxquant.convert(qmodel), tvm_module, test_batches)
        agreement.check(atol=1e-4, min_agreement=1.0)
    """
    samples = agree = ref_correct = cand_correct = 0
    max_diff, sum_diff, elements = 0.0, 0.0, 0
    for x, y in batches:
        ref, cand = reference(x), torch.as_tensor(candidate(x))
        if ref.shape != cand.shape:
            raise VerificationError(f"output shapes differ: reference {tuple(ref.shape)} vs {tuple(cand.shape)}")
        diff = (ref.double() - cand.double()).abs().nan_to_num(nan=float("inf"))  # a NaN fails any tolerance
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        elements += diff.numel()
        ref_top, cand_top = ref.argmax(1), cand.argmax(1)
        agree += int((ref_top == cand_top).sum())
        ref_correct += int((ref_top == y).sum())
        cand_correct += int((cand_top == y).sum())
        samples += len(y)
    if samples == 0:
        raise VerificationError("no data to verify on")
    return Agreement(
        samples=samples,
        max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / max(elements, 1),
        top1_agreement=agree / samples,
        reference_accuracy=100.0 * ref_correct / samples,
        candidate_accuracy=100.0 * cand_correct / samples,
    )
