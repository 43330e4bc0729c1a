"""A bitwidth plan: per-layer (weight bits, activation bits), as the SDQ search returns it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fxquant.config import MAX_BITS, MIN_BITS
from fxquant.errors import ConfigError

__all__ = ["BitwidthPlan"]

PLAN_FORMAT = "fxquant.bitwidth_plan/1"


@dataclass(frozen=True)
class BitwidthPlan:
    """Layer name → ``(weight_bits, act_bits)``; applied by ``QuantConfig(plan=...)``.

    Example::

        plan = BitwidthPlan({"conv1": (8, 8), "layer1.0.conv1": (3, 4)})
        plan.save("plan.json"); BitwidthPlan.load("plan.json") == plan
        plan.report("plan.png")   # per-layer table and bar chart (a searched plan carries the layer sizes)

    ``metadata`` must be JSON data; a searched plan keeps the budget, the achieved costs, the layer sizes
    (``metadata["layers"]``), the ties and the search's sensitivities there.
    """

    bits: Mapping[str, tuple[int, int]]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for name, pair in dict(self.bits).items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"plan[{name!r}] must be (weight_bits, act_bits), got {pair!r}")
            for what, b in zip(("weight_bits", "act_bits"), pair, strict=True):
                if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                    raise ConfigError(f"plan[{name!r}].{what}={b!r} is invalid: expected {MIN_BITS}..{MAX_BITS}")
            clean[name] = (int(pair[0]), int(pair[1]))
        object.__setattr__(self, "bits", clean)
        object.__setattr__(self, "metadata", dict(self.metadata))

    def check_layers(self, layers: list[str]) -> None:
        unknown = sorted(set(self.bits) - set(layers))
        if unknown:
            raise ConfigError(f"plan names layers the model does not have: {unknown}; layers are: {layers}")

    def to_dict(self) -> dict[str, Any]:
        bits = {k: list(v) for k, v in self.bits.items()}
        return {"format": PLAN_FORMAT, "bits": bits, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitwidthPlan:
        if data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"not a bitwidth plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        return cls({k: tuple(v) for k, v in data["bits"].items()}, data.get("metadata", {}))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (a crash never leaves half a plan)."""
        from fxquant.output_files import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def report(
        self,
        png_path: str | os.PathLike | None = None,
        costs: Mapping[str, Any] | None = None,
        file: TextIO | None = None,
        title: str | None = None,
        quiet: bool = False,
    ) -> str:
        """Per-layer table of bits, MACs and BitOPs (printed unless ``quiet``), and a bar chart with
        ``png_path``; see :func:`fxquant.search_report`."""
        from fxquant.search import search_report

        return search_report(self, png_path, costs, file, title, quiet)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitwidthPlan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read bitwidth plan {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # JSON syntax or not UTF-8
            raise ConfigError(f"cannot read bitwidth plan {path}: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"bitwidth plan {path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"bitwidth plan {path}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bitwidth plan {path} is malformed: {type(exc).__name__}: {exc}") from exc
