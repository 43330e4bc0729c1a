"""The settings of the SDQ search loop, and the loss it trains with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fxquant.errors import ConfigError
from fxquant.passes.analysis.layer_graph import TiePolicy

__all__ = ["SearchOptions"]


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SearchOptions:
    """Settings of the search loop; the defaults suit a ResNet on Fashion-MNIST/CIFAR from a trained start.

    ``steps=None`` runs one pass over the loader; ``interval=None`` gives ``2·(max_bits − min_bits)``
    intervals, room for every unit to reach the floor. ``checkpoint_every=None`` saves at interval ends.
    ``lr``/``momentum``: SGD of the model and quantizer parameters; ``dbp_lr``: plain SGD of the DBP logits;
    ``penalty``: λ of the budget term; ``temperature``, ``init_logit``: the DBPs' Gumbel-sigmoid and their
    (re)start value; ``threshold``: the keep-probability below which a unit steps down; ``fill``: let the
    rounding spend budget left over; ``ties``: the :class:`TiePolicy`.
    """

    steps: int | None = None
    interval: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    dbp_lr: float = 10.0
    penalty: float = 2.0
    temperature: float = 1.0
    threshold: float = 0.5
    init_logit: float = 2.0
    fill: bool = True
    ties: TiePolicy = field(default_factory=TiePolicy)
    seed: int = 0
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "interval", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"SearchOptions.{name}={value!r} is invalid: expected a positive integer or None")
        for name in ("lr", "dbp_lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"SearchOptions.{name}={value!r} is invalid: expected a number > 0")
        if not isinstance(self.penalty, (int, float)) or not self.penalty >= 0:
            raise ConfigError(f"SearchOptions.penalty={self.penalty!r} is invalid: expected a number >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"SearchOptions.momentum={self.momentum!r} is invalid: expected 0 <= momentum < 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"SearchOptions.threshold={self.threshold!r} is invalid: expected 0 < threshold < 1")
        if not math.isfinite(self.init_logit):
            raise ConfigError(f"SearchOptions.init_logit={self.init_logit!r} is invalid: expected a finite number")
        if not isinstance(self.ties, TiePolicy):
            raise ConfigError(f"SearchOptions.ties must be a TiePolicy, got {type(self.ties).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ties"] = asdict(self.ties)
        return out
