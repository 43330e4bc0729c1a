"""The target of the SDQ search: one cost bound, and the bit-width range the search may use.

Exactly one bound is set: the parameter-weighted average weight bit-width, the BitOPs per sample
(``Σ MACs × w_bits × a_bits``) or the deployed size in bytes of the quantized layers (see
:mod:`fxquant.passes.cost_model` for what each counts). The paper's cost target was not retrieved; offering
all three is our choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fxquant.config import MAX_BITS, MIN_BITS, reject_unknown_fields
from fxquant.errors import ConfigError

__all__ = ["Budget", "METRICS"]

METRICS = ("avg_weight_bits", "bitops", "size_bytes")

#: relative slack when comparing a cost with its bound (the cost is a float sum)
TOLERANCE = 1e-9


def _check_bits(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"Budget.{option}={value!r} is invalid: expected an integer from {MIN_BITS} to {MAX_BITS}")


@dataclass(frozen=True)
class Budget:
    """What the searched plan must satisfy, and the bit-widths the search may pick.

    ``max_bits`` is where every searched layer starts; bit-widths only go down from there, to ``min_bits``
    at the lowest. Activation bits are fixed at ``act_bits`` (``None``: the config's ``act_bits``) unless
    ``search_act_bits`` is set, in which case they are searched over the same range.

    Example::

        Budget(avg_weight_bits=3.0)                  # weights average 3 bits, activations at the config's bits
        Budget(bitops=2e8, search_act_bits=True)     # weights and activations searched under a BitOPs bound
    """

    avg_weight_bits: float | None = None
    bitops: float | None = None
    size_bytes: float | None = None
    min_bits: int = 2
    max_bits: int = 8
    act_bits: int | None = None
    search_act_bits: bool = False

    def __post_init__(self) -> None:
        given = [m for m in METRICS if getattr(self, m) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Budget needs exactly one of {', '.join(METRICS)}; got {', '.join(given) if given else 'none'}"
            )
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"Budget.{given[0]}={value!r} is invalid: expected a positive finite number")
        object.__setattr__(self, given[0], float(value))
        _check_bits("min_bits", self.min_bits)
        _check_bits("max_bits", self.max_bits)
        if self.min_bits > self.max_bits:
            raise ConfigError(f"Budget.min_bits={self.min_bits} is above max_bits={self.max_bits}")
        if self.act_bits is not None:
            _check_bits("act_bits", self.act_bits)
        if not isinstance(self.search_act_bits, bool):
            raise ConfigError(f"Budget.search_act_bits={self.search_act_bits!r} is invalid: expected True or False")
        if self.search_act_bits and self.act_bits is not None:
            raise ConfigError("Budget: act_bits fixes the activation bits, search_act_bits searches them; set one")

    @property
    def metric(self) -> str:
        """The name of the bound that is set: one of :data:`METRICS`."""
        return next(m for m in METRICS if getattr(self, m) is not None)

    @property
    def target(self) -> float:
        return float(getattr(self, self.metric))

    def met_by(self, cost: float) -> bool:
        """Whether ``cost`` (in this budget's metric) is within the bound, up to float rounding."""
        return cost <= self.target * (1.0 + TOLERANCE)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        reject_unknown_fields(cls, data, "unknown Budget key(s)")
        return cls(**dict(data))
