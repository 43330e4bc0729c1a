"""A resumable QAT trainer: SGD with a one-cycle schedule, quantizer schedules, and state that checkpoints.

Training can stop after any number of steps and continue in another process with the same result as an
uninterrupted run: the state holds the optimizer, the LR scheduler, the position (epoch, step), the torch
RNG and the data shuffler's state at the start of the current epoch, which is replayed to skip the
batches already seen. The schedule length (``epochs``) is fixed when training starts.

Where it runs (a :class:`~fxquant.placement.Placement`: device, mixed precision, torchrun rank) is not part
of the state: a run saved on a GPU resumes on the CPU and the reverse, and a run of N processes resumes with
M, because every process steps through the same global batches and the state counts those.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from fxquant.api import update_schedules
from fxquant.data.fashion_mnist import TensorBatches
from fxquant.data.replay import replay_epoch
from fxquant.errors import CheckpointError, ConfigError
from fxquant.placement import Placement
from fxquant.training.agreement import DEFAULT_TOLERANCE, AgreementReport, ensure_agreement
from fxquant.training.loop import train_epoch
from fxquant.validate import reject_unknown_fields

__all__ = ["TrainSettings", "QATTrainer"]


@dataclass(frozen=True)
class TrainSettings:
    """What fixes a training run; a resumed run must keep all of these."""

    data: str = "fashion-mnist"
    epochs: int = 1
    batch_size: int = 64
    train_subset: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    # -- low-bit practice --
    #: end-of-schedule train/eval accuracy check in points (None: skipped); see :mod:`fxquant.training.agreement`
    agreement_tolerance: float | None = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: expected a positive integer")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid: expected a non-negative number")
        tol = self.agreement_tolerance
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 100):
            raise ConfigError(f"agreement_tolerance={tol!r} is invalid: expected accuracy points in [0, 100] or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainSettings:
        """Settings from plain data (a checkpoint's record); a key that is not a setting is an error."""
        reject_unknown_fields(cls, data, "unknown training setting(s)")
        return cls(**data)


class _Batches:
    """Batches ``skip .. skip+count`` of one epoch of ``loader``, its shuffle replayed from ``rng_state``."""

    def __init__(self, loader: TensorBatches, rng_state: torch.Tensor, skip: int, count: int):
        self.loader, self.rng_state, self.skip, self.count = loader, rng_state, skip, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(replay_epoch(self.loader, self.rng_state, self.skip), self.count)


class QATTrainer:
    """Train a prepared model; ``state_dict()``/``load_state_dict()`` make runs resumable.

    Example::

        trainer = QATTrainer(qmodel, train_batches, TrainSettings(epochs=2))
        trainer.run(max_steps=100)          # later, in a new process: load_state_dict(...) and run() again
    """

    def __init__(
        self, model: fx.GraphModule, loader: TensorBatches, settings: TrainSettings, placement: Placement | None = None
    ):
        self.placement = placement if placement is not None else Placement()
        self.model, self.loader, self.settings = model.to(self.placement.device), loader, settings
        self.trained = self.placement.wrap(self.model)  # what the steps call: the model or its DDP wrapper
        self.steps_per_epoch = len(loader)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0,
            weight_decay=settings.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=settings.lr, total_steps=max(self.total_steps, 1), pct_start=0.15
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.epoch_rng_state = loader.generator.get_state()
        #: the end-of-schedule train/eval check (set when a run finishes the schedule)
        self.agreement: AgreementReport | None = None

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    def run(self, max_steps: int | None = None, progress: bool = False) -> list[float]:
        """Train up to ``max_steps`` more steps (to the end of the schedule by default); mean loss per epoch part.

        Raises :class:`~fxquant.errors.NumericsError` naming the layer where a NaN/Inf first appeared.
        """
        budget = self.total_steps - self.global_step
        if max_steps is not None:
            budget = min(budget, max_steps)
        losses = []
        while budget > 0:
            count = min(budget, self.steps_per_epoch - self.step_in_epoch)
            base = self.global_step
            batches = _Batches(self.loader, self.epoch_rng_state, self.step_in_epoch, count)
            losses.append(train_epoch(
                self.trained, batches, self.optimizer, self.scheduler, progress and self.placement.writes_files,
                on_step=lambda s, base=base: update_schedules(self.model, min(1.0, (base + s + 1) / self.total_steps)),
                description=f"epoch {self.epoch + 1}/{self.settings.epochs}", placement=self.placement,
            ))
            budget -= count
            self.step_in_epoch += count
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.epoch_rng_state = self.loader.generator.get_state()  # the shuffle of the next epoch starts here
        if self.finished and losses and self.settings.agreement_tolerance is not None:
            self.agreement = self.check_agreement()
        return losses

    def check_agreement(self) -> AgreementReport:
        """Training-mode vs eval-mode accuracy on training batches, batch norm re-estimated if they differ.

        Runs on the next epoch's shuffle without consuming it: the loader's RNG is restored afterwards.
        """
        state = self.loader.generator.get_state()
        try:
            return ensure_agreement(self.model, self.loader, self.settings.agreement_tolerance or 0.0)
        finally:
            self.loader.generator.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps,
            "epoch_rng_state": self.epoch_rng_state.clone(),
            "torch_rng_state": torch.get_rng_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run; the data and settings must be the ones it started with."""
        if TrainSettings.from_dict(state["settings"]) != self.settings:
            raise CheckpointError(f"training state was made with other settings: {state['settings']}")
        if state["total_steps"] != self.total_steps:
            raise CheckpointError(
                f"training state expects {state['total_steps']} steps in all, the data gives {self.total_steps}"
            )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.epoch_rng_state = state["epoch_rng_state"].clone()
        torch.set_rng_state(state["torch_rng_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
