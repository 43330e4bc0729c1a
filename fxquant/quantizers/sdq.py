"""SDQ: Stochastic Differentiable Quantization (Huang et al., ICML 2022, arXiv 2206.04459).

The paper's verified idea: a Differentiable Bitwidth Parameter (DBP) is the probability factor of a
stochastic choice between *adjacent* bit-widths. Its exact equations were not available, so the mechanics
here are ours (docs/design.md, section "SDQ"):

- One learnable logit ``θ`` per quantizer; ``p = sigmoid(θ)`` is the probability of using the current
  bit-width ``b`` rather than ``b − 1``. A base quantizer (DSQ by default, option ``base``) is evaluated at
  both bit-widths with the same learned parameters (its clip range and α).
- Each training forward samples the choice with a straight-through Gumbel-sigmoid: ``s = sigmoid((θ + g)/τ)``
  with logistic noise ``g``; the forward value is exactly ``Q_b(x)`` when ``s > ½`` (probability ``p``) and
  ``Q_{b−1}(x)`` otherwise, and ``θ`` receives the gradient of ``s·(Q_b(x) − Q_{b−1}(x))``, so the task loss
  raises ``p`` where the extra bit helps.
- The hard form (eval, ``grid``, ``codes``, freezing) is the base quantizer at ``b``.
- The gradient that reaches the relaxed sample, ``∂L/∂z = Σ ∂L/∂y · (Q_b(x) − Q_{b−1}(x))``, is the
  first-order change of the loss between the two bit-widths; its running sum (:attr:`task_grad_sum`,
  ``task_grad_count``) is the DBP's measure of how much the layer needs bit ``b`` (:meth:`sensitivity`).
- :meth:`step_down` moves to ``b − 1``, resets ``θ`` and that record, and re-initialises the base range at the
  next forward (a range fitted to 8 bits wastes most levels at 3). At ``min_bits`` it is deterministic.

The search (:mod:`fxquant.sdq.loop`) drives the step-downs and shares one ``θ`` (and one noise
draw, through :attr:`noise`) between tied layers; used on its own (``QuantConfig(quantizer="sdq")``) the
quantizer trains with stochastic precision at fixed ``b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxquant.bits import check_bits
from fxquant.errors import ConfigError
from fxquant.quantizers.base import Quantizer, Role
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import get_quantizer, register_quantizer

__all__ = ["StochasticBitwidthQuantizer", "SDQOptions", "gumbel_sigmoid"]

NOISE_EPS = 1e-6


def gumbel_sigmoid(
    logit: torch.Tensor, temperature: float, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Bernoulli(``sigmoid(logit)``) sample as ``(hard bool, relaxed value)``; ``uniform`` is the U(0, 1) draw.

    ``hard = (logit + g > 0)`` with logistic noise ``g = log u − log(1 − u)``, so ``P(hard) = sigmoid(logit)``
    exactly; ``relaxed = sigmoid((logit + g)/τ)`` carries the gradient.
    """
    u = torch.rand((), device=logit.device) if uniform is None else uniform.to(logit.device)
    u = u.clamp(NOISE_EPS, 1.0 - NOISE_EPS)
    relaxed = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
    return relaxed.detach() > 0.5, relaxed


@dataclass(frozen=True, eq=False)
class SDQOptions(QuantizerOptions):
    """``base``: the fixed-bit scheme evaluated at both bit-widths, with ``base_options`` (its options; a mapping
    is converted to the base's options class); ``min_bits``: the lowest bit-width a step-down reaches;
    ``temperature``: the Gumbel-sigmoid's ``τ``; ``init_logit``: the DBP's ``θ`` at the start and after each
    step-down."""

    base: str = "dsq"
    base_options: QuantizerOptions | Mapping[str, Any] = field(default_factory=dict)
    min_bits: int = 1
    temperature: float = 1.0
    init_logit: float = 2.0

    def check(self) -> None:
        if self.base == "sdq":
            raise ConfigError("quantizer_options base='sdq' is invalid: the base must be a fixed-bit scheme")
        if not isinstance(self.base_options, Mapping):
            raise ConfigError(f"quantizer_options base_options={self.base_options!r} must be a mapping")
        object.__setattr__(self, "base_options", get_quantizer(self.base).parse_options(self.base_options))
        check_bits("quantizer_options min_bits", self.min_bits)
        if not self.temperature > 0:
            raise ConfigError(
                f"quantizer_options temperature={self.temperature!r} is invalid: expected a number > 0"
            )
        if not math.isfinite(self.init_logit):
            raise ConfigError(f"quantizer_options init_logit={self.init_logit!r} is invalid: expected a finite number")


@register_quantizer("sdq")
class StochasticBitwidthQuantizer(Quantizer):
    """A base quantizer used at ``bits`` or ``bits − 1``, chosen at random with a learned probability."""

    options_class = SDQOptions
    options: SDQOptions

    def __init__(
        self, bits: int, role: Role, channels: int | None = None, options: SDQOptions | Mapping[str, Any] | None = None
    ):
        super().__init__(bits, role, channels, options)
        self.base: Quantizer = get_quantizer(self.options.base)(bits, role, channels, self.options.base_options)
        self.floor = self.options.min_bits
        self.temperature = self.options.temperature
        self.init_logit = self.options.init_logit
        self.logit = nn.Parameter(torch.tensor(self.init_logit))
        self.register_buffer("active", torch.tensor(self.bits > self.floor))
        self.register_buffer("task_grad_sum", torch.zeros(()))
        self.register_buffer("task_grad_count", torch.zeros((), dtype=torch.int64))
        #: a U(0, 1) draw set by the search for every member of a tie group; ``None`` draws privately
        self.noise: torch.Tensor | None = None
        #: the bit-widths this quantizer may take, ascending (set by a search that drops bit-widths the target
        #: cannot exploit); ``None``: every bit-width from ``min_bits`` up. The lower choice is the next one down.
        self.ladder: tuple[int, ...] | None = None

    # -- bit-width state ----------------------------------------------------------------------------------

    @property
    def uniform(self) -> bool:
        return self.base.uniform

    @property
    def lower_bits(self) -> int:
        """The other choice: ``bits − 1``, or the next bit-width down the :attr:`ladder`."""
        if self.ladder is None:
            return self.bits - 1
        return max((b for b in self.ladder if b < self.bits), default=self.bits - 1)

    def set_ladder(self, ladder: tuple[int, ...]) -> None:
        """Offer only ``ladder`` (ascending, containing the current bits); its lowest entry is the floor."""
        if self.bits not in ladder or list(ladder) != sorted(set(ladder)):
            raise ConfigError(f"ladder {ladder} must be ascending and contain the current bits={self.bits}")
        self.ladder = tuple(int(b) for b in ladder)
        self.floor = self.ladder[0]
        self.active.fill_(bool(self.active) and self.bits > self.floor)

    @property
    def stochastic(self) -> bool:
        """Whether training forwards still choose between ``bits`` and :attr:`lower_bits`."""
        return bool(self.active) and self.bits > self.floor

    def keep_probability(self) -> torch.Tensor:
        """``p = sigmoid(θ)``, differentiable; 1 when the quantizer is deterministic."""
        if not self.stochastic:
            return torch.ones((), device=self.logit.device)
        return torch.sigmoid(self.logit)

    def sensitivity(self) -> float | None:
        """Mean loss increase of using ``b − 1`` instead of ``b`` seen so far at ``b`` (``−mean ∂L/∂z``)."""
        count = int(self.task_grad_count)
        return -float(self.task_grad_sum) / count if count else None

    def _record_task_grad(self, grad: torch.Tensor) -> None:
        self.task_grad_sum.add_(grad.detach().reshape(()).to(self.task_grad_sum.dtype))
        self.task_grad_count.add_(1)

    def set_bits(self, bits: int) -> None:
        self.bits = int(bits)
        self.base.bits = int(bits)

    def step_down(self) -> None:
        """``b ← lower_bits``; the DBP restarts at its initial logit and the range is refitted at the next forward."""
        if self.bits <= self.floor:
            raise ConfigError(f"cannot step below min_bits={self.floor}")
        self.set_bits(self.lower_bits)
        with torch.no_grad():
            self.logit.fill_(self.init_logit)
        self.task_grad_sum.zero_()
        self.task_grad_count.zero_()
        self.reset_initialized()
        self.active.fill_(self.bits > self.floor)

    def _at_bits(self, bits: int, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        saved = self.base.bits
        self.base.bits = bits
        try:
            return fn(x)
        finally:
            self.base.bits = saved

    # -- the contract ---------------------------------------------------------------------------------------

    def initialize(self, x: torch.Tensor) -> None:
        self.base.initialize(x)
        self.base.initialized.fill_(True)

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.base.soft_forward(x)
        if not self.stochastic:
            return high
        low = self._at_bits(self.lower_bits, self.base.soft_forward, x)
        hard, relaxed = gumbel_sigmoid(self.logit, self.temperature, self.noise)
        if relaxed.requires_grad:
            relaxed.register_hook(self._record_task_grad)
        # forward: exactly one of the two; gradient: the chosen branch, and θ through the relaxed sample
        return torch.where(hard, high, low) + (relaxed - relaxed.detach()) * (high - low)

    def update_schedule(self, progress: float) -> None:
        self.base.update_schedule(progress)

    def track_weight(self, weight: torch.Tensor) -> None:
        self.base.track_weight(weight)

    def grid(self) -> QuantGrid:
        return self.base.grid()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.codes(x)

    def integer_weight(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.integer_weight(codes)

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.hard_forward(x)

    def extra_repr(self) -> str:
        p = float(torch.sigmoid(self.logit.detach()))
        choice = f"bits={self.bits}|{self.lower_bits}, p_keep={p:.3f}" if self.stochastic else f"bits={self.bits}"
        return f"{choice}, role={self.role}, base={self.options.base}"
