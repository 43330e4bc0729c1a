"""The target of the SDQ search: one cost bound, and the bit-width range the search may use.

Exactly one bound is set: the parameter-weighted average weight bit-width, the BitOPs per sample
(``Σ MACs × w_bits × a_bits``), the deployed size in bytes of the quantized layers (see
:mod:`fxquant.passes.analysis.cost_model` for what each counts), or the latency in milliseconds of the integer
kernels ``convert`` would emit on a named target (:mod:`fxquant.backends.tvm.latency_table`). The paper's cost
target was not available; offering these is our choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fxquant.bits import check_bits
from fxquant.errors import ConfigError
from fxquant.validate import reject_unknown_fields

__all__ = ["Budget", "METRICS"]

METRICS = ("avg_weight_bits", "bitops", "size_bytes", "latency_ms")
#: the fields that only mean something for a ``latency_ms`` budget
LATENCY_FIELDS = ("target", "cost_model", "threads", "batch")

#: relative slack when comparing a cost with its bound (the cost is a float sum)
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """What the searched plan must satisfy, and the bit-widths the search may pick.

    ``max_bits`` is where every searched layer starts; bit-widths only go down from there, to ``min_bits``
    at the lowest. Activation bits are fixed at ``act_bits`` (``None``: the config's ``act_bits``) unless
    ``search_act_bits`` is set, in which case they are searched over the same range.

    Example::

        Budget(avg_weight_bits=3.0)                  # weights average 3 bits, activations at the config's bits
        Budget(bitops=2e8, search_act_bits=True)     # weights and activations searched under a BitOPs bound
        Budget(latency_ms=2.5, target="cortex-a76")  # kernel latency of one sample on that core (modelled)

    A ``latency_ms`` budget names its ``target``: ``"host"`` (this machine; ``cost_model="measure"`` times
    every candidate kernel, ``"model"`` uses the static model) or a named aarch64 core of
    :data:`fxquant.backends.tvm.arm_cores.ARM_CORES` (always ``"model"``: the llvm-mca based estimate).
    ``threads`` and ``batch`` are the thread count and batch size the latency is for (``convert`` the plan
    with ``num_threads=threads``).
    """

    avg_weight_bits: float | None = None
    bitops: float | None = None
    size_bytes: float | None = None
    min_bits: int = 2
    max_bits: int = 8
    act_bits: int | None = None
    search_act_bits: bool = False
    latency_ms: float | None = None
    target: str = "host"
    cost_model: str | None = None
    threads: int = 1
    batch: int = 1

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
        check_bits("Budget.min_bits", self.min_bits)
        check_bits("Budget.max_bits", self.max_bits)
        if self.min_bits > self.max_bits:
            raise ConfigError(f"Budget.min_bits={self.min_bits} is above max_bits={self.max_bits}")
        if self.act_bits is not None:
            check_bits("Budget.act_bits", self.act_bits)
        if not isinstance(self.search_act_bits, bool):
            raise ConfigError(f"Budget.search_act_bits={self.search_act_bits!r} is invalid: expected True or False")
        if self.search_act_bits and self.act_bits is not None:
            raise ConfigError("Budget: act_bits fixes the activation bits, search_act_bits searches them; set one")
        self._check_latency_fields()

    def _check_latency_fields(self) -> None:
        if self.latency_ms is None:
            changed = [f for f in LATENCY_FIELDS if getattr(self, f) != _DEFAULTS[f]]
            if changed:
                raise ConfigError(f"Budget.{changed[0]} applies to a latency_ms budget only")
            return
        from fxquant.backends.tvm.arm_cores import ARM_CORES  # imports TVM: only for latency budgets

        targets = ("host", *ARM_CORES)
        if self.target not in targets:
            raise ConfigError(f"Budget.target={self.target!r} is invalid: expected one of {', '.join(targets)}")
        allowed = ("measure", "model") if self.target == "host" else ("model",)
        model = self.cost_model if self.cost_model is not None else allowed[0]
        if model not in allowed:
            raise ConfigError(
                f"Budget.cost_model={self.cost_model!r} is invalid for target {self.target!r}: expected "
                + " or ".join(repr(m) for m in allowed)
            )
        object.__setattr__(self, "cost_model", model)
        for option in ("threads", "batch"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Budget.{option}={value!r} is invalid: expected a positive integer")

    @property
    def metric(self) -> str:
        """The name of the bound that is set: one of :data:`METRICS`."""
        return next(m for m in METRICS if getattr(self, m) is not None)

    @property
    def bound(self) -> float:
        """The value of the bound that is set."""
        return float(getattr(self, self.metric))

    def met_by(self, cost: float) -> bool:
        """Whether ``cost`` (in this budget's metric) is within the bound, up to float rounding."""
        return cost <= self.bound * (1.0 + TOLERANCE)

    def to_dict(self) -> dict[str, Any]:
        """The set fields (the latency-only ones only for a latency budget), as :meth:`from_dict` reads them."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if self.latency_ms is not None or f.name not in (*LATENCY_FIELDS, "latency_ms")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        reject_unknown_fields(cls, data, "unknown Budget key(s)")
        return cls(**dict(data))


_DEFAULTS = {f.name: f.default for f in fields(Budget)}
