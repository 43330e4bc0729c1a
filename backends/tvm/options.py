"""Validated options of the TVM backends, so a typo in ``convert(..., **options)`` fails loudly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxquant.config import reject_unknown_fields
from fxquant.errors import ConfigError

__all__ = ["TvmOptions", "ArmOptions", "DEFAULT_BITSERIAL_MAX_BITS"]

#: above this many bits (weights or activations) the bit-serial kernel does more bit-plane pairs than pays off
DEFAULT_BITSERIAL_MAX_BITS = 4


@dataclass(frozen=True)
class TvmOptions:
    """Options shared by ``"tvm-llvm"`` and ``"tvm-arm"``.

    ``example_inputs`` fixes the input shapes when the graph carries no ``tensor_meta``; ``bitserial_max_bits``
    is the largest weight/activation bitwidth sent to the bit-serial kernel; ``bitserial=False`` turns that
    kernel off; ``debug_accumulators`` adds every integer layer's int32 accumulator as an extra output;
    ``target`` replaces (key by key) the target dict the backend picks.
    """

    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None
    bitserial_max_bits: int = DEFAULT_BITSERIAL_MAX_BITS
    bitserial: bool = True
    debug_accumulators: bool = False
    target: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        bits = self.bitserial_max_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 8:
            raise ConfigError(f"bitserial_max_bits={bits!r} is invalid: expected an integer from 0 to 8")
        for flag in ("bitserial", "debug_accumulators"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} is invalid: expected True or False")
        if self.target is not None and not isinstance(self.target, Mapping):
            raise ConfigError(f"target={self.target!r} is invalid: expected a dict such as {{'kind': 'llvm'}}")
        inputs = self.example_inputs
        if inputs is not None:
            items = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            if not all(isinstance(t, torch.Tensor) for t in items):
                raise ConfigError("example_inputs must be a tensor or a sequence of tensors")
            object.__setattr__(self, "example_inputs", items)

    @classmethod
    def parse(cls, backend: str, options: Mapping[str, Any]) -> TvmOptions:
        """Build from ``convert()`` keyword options; an unknown key names the allowed ones."""
        reject_unknown_fields(cls, options, f"backend {backend!r}: unknown option(s)")
        return cls(**options)


@dataclass(frozen=True)
class ArmOptions(TvmOptions):
    """``"tvm-arm"`` adds where to write the artifact folder and whether an existing one may be replaced."""

    output_dir: str | Path | None = None
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_dir is None or str(self.output_dir) == "":
            raise ConfigError("backend 'tvm-arm' needs output_dir=PATH (the artifact folder to write)")
        if not isinstance(self.output_dir, str | Path):
            raise ConfigError(f"output_dir={self.output_dir!r} is invalid: expected a path")
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if not isinstance(self.force, bool):
            raise ConfigError(f"force={self.force!r} is invalid: expected True or False")
