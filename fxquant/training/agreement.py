"""Training and eval of a prepared model must predict the same: check it, and re-estimate batch norm when not.

In training a quantized layer normalises with the batch's statistics; in eval (and in every deployed graph)
it folds the *running* statistics into its integer weights. The two agree only if the running statistics
are those of the quantized model. They lag behind when the weights change fast (the last steps of a short
schedule) and, at 1-2 bits, a small shift of the folded bias moves many values across a threshold, so a
model can train well and collapse in eval. :func:`check_agreement` measures the top-1 accuracy of both
modes on the same batches (and how often their predictions differ); :func:`reestimate_bn` replaces the
running statistics by those of the quantized model; :func:`ensure_agreement` checks, re-estimates when the
check fails, and checks again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from fxquant.errors import ConfigError, InputError
from fxquant.quantizers.base import Quantizer

__all__ = ["AgreementReport", "check_agreement", "reestimate_bn", "ensure_agreement", "DEFAULT_TOLERANCE"]

#: the largest gap, in accuracy points, between training-mode and eval-mode top-1 accuracy on the checked batches.
#: At 1-bit activations training mode's batch statistics alone flip ~10 % of predictions from batch to batch,
#: so the gap measured on ~2000 samples has a spread near 1 point; a collapse is tens of points.
DEFAULT_TOLERANCE = 2.0
#: re-estimation passes: the folded weights depend on the running variance, so a second pass sees the new fold
REESTIMATE_PASSES = 2

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AgreementReport:
    """Top-1 predictions of training mode (batch statistics) and eval mode (running statistics, integer layers).

    The check passes when the accuracy gap is at most ``tolerance`` points. ``disagreement`` is the fraction
    of samples whose predictions differ (it bounds the gap; batch statistics alone make it non-zero).
    ``reestimated`` says whether batch-norm statistics were re-estimated, and ``gap_before`` is the
    accuracy gap measured before that.
    """

    samples: int
    train_accuracy: float
    eval_accuracy: float
    disagreement: float
    tolerance: float
    reestimated: bool = False
    gap_before: float | None = None

    @property
    def gap(self) -> float:
        return abs(self.train_accuracy - self.eval_accuracy)

    @property
    def passed(self) -> bool:
        return self.gap <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap, "passed": self.passed}

    def summary(self) -> str:
        before = f" after batch-norm re-estimation (gap before: {self.gap_before:.2f})" if self.reestimated else ""
        return (f"accuracy in training mode {self.train_accuracy:.2f}%, eval mode {self.eval_accuracy:.2f}% on "
                f"{self.samples} samples: gap {self.gap:.2f} points{before}, tolerance {self.tolerance:.2f}; "
                f"predictions differ on {100 * self.disagreement:.2f}%")


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def _state_kept(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Yield ``restore()``, which puts every buffer back (a training forward moves BN and STE statistics);
    buffers and train/eval flags are restored on exit too."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}

    def restore() -> None:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])

    try:
        yield restore
    finally:
        restore()
        for m, training in modes.items():
            m.training = training


def _taken(batches: Batches, max_batches: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches={max_batches!r} is invalid: expected a positive integer")
    taken = list(islice(batches, max_batches))
    if not taken:
        raise InputError("the train/eval agreement check needs at least one batch")
    return taken


@torch.no_grad()
def check_agreement(
    model: nn.Module, batches: Batches, tolerance: float = DEFAULT_TOLERANCE, max_batches: int | None = 16
) -> AgreementReport:
    """Compare training-mode and eval-mode predictions of ``model`` on the same batches; changes no state."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance <= 100.0:
        raise ConfigError(f"tolerance={tolerance!r} is invalid: expected accuracy points in [0, 100]")
    taken = _taken(batches, max_batches)
    differ = train_correct = eval_correct = count = 0
    with _state_kept(model) as restore:
        for x, y in taken:  # every batch sees the model as it was given
            model.train()
            train_pred = model(x).argmax(1)
            restore()
            model.eval()
            eval_pred = model(x).argmax(1)
            differ += int((train_pred != eval_pred).sum())
            train_correct += int((train_pred == y).sum())
            eval_correct += int((eval_pred == y).sum())
            count += len(y)
    return AgreementReport(count, 100.0 * train_correct / count, 100.0 * eval_correct / count, differ / count,
                           float(tolerance))


def _mean_batch_statistics(
    model: nn.Module, norms: list[nn.modules.batchnorm._BatchNorm], taken: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Mean over ``taken`` of each batch norm's input mean and unbiased variance per channel (one forward each)."""
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def record(bn: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        stats = [x.mean(dims), x.var(dims, unbiased=x.numel() // x.shape[1] > 1)]
        if bn in sums:
            for total, value in zip(sums[bn], stats, strict=True):
                total.add_(value)
        else:
            sums[bn] = stats

    hooks = [bn.register_forward_pre_hook(record) for bn in norms]
    try:
        for x, _ in taken:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {bn: (mean / len(taken), var / len(taken)) for bn, (mean, var) in sums.items()}


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Batches, max_batches: int | None = 32,
                  passes: int = REESTIMATE_PASSES) -> int:
    """Set each batch norm's running statistics to the mean batch statistics of the *quantized* model.

    Quantizers run their hard (deployed) forward, the layers their training path, so each batch norm sees
    what the folded integer layer will compute. Batch norms that see no data (frozen statistics) keep
    theirs. Returns how many batch norms were updated.
    """
    taken = _taken(batches, max_batches)
    norms = _batch_norms(model)
    updated: set[int] = set()
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    tracked = {bn: bn.num_batches_tracked.clone() for bn in norms}  # these forwards are not training steps
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, Quantizer):
                m.eval()
        for bn in norms:
            bn.momentum = 0.0  # the forward leaves the running statistics as they are
        for _ in range(passes):
            for bn, (mean, var) in _mean_batch_statistics(model, norms, taken).items():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                updated.add(id(bn))
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked[bn])
        for m, training in modes.items():
            m.training = training
    return len(updated)


def ensure_agreement(
    model: nn.Module, batches: Batches, tolerance: float = DEFAULT_TOLERANCE, check_batches: int | None = 16,
    reestimate_batches: int | None = 32,
) -> AgreementReport:
    """Check agreement; when it fails, re-estimate batch-norm statistics on ``batches`` and check again.

    The new statistics are kept only if they narrow the gap without lowering eval accuracy on the checked
    batches; otherwise the first report is returned (``reestimated`` False) and the model is unchanged.

    Call it after QAT (``fxquant train`` and :class:`~fxquant.training.trainer.QATTrainer` do at the end of their
    schedule). A report that still fails means eval accuracy differs from what training showed: do not ship.
    """
    batches = list(islice(batches, max(check_batches or 0, reestimate_batches or 0) or None))
    first = check_agreement(model, batches, tolerance, check_batches)
    if first.passed or not _batch_norms(model):
        return first
    kept = {bn: (bn.running_mean.clone(), bn.running_var.clone()) for bn in _batch_norms(model)}
    reestimate_bn(model, batches, reestimate_batches)
    second = check_agreement(model, batches, tolerance, check_batches)
    if second.gap < first.gap and second.eval_accuracy >= first.eval_accuracy:
        return AgreementReport(second.samples, second.train_accuracy, second.eval_accuracy, second.disagreement,
                               second.tolerance, reestimated=True, gap_before=first.gap)
    # at 2+ bits a learned clip range is in folded-weight units, so new statistics also change the quantized
    # weights: keep them only when they help, on the checked batches
    with torch.no_grad():
        for bn, (mean, var) in kept.items():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return first
