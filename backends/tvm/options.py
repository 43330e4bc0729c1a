"""Validated options of the TVM backends, so a typo in ``convert(..., **options)`` fails loudly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxquant.batching import check_batch_sizes
from fxquant.errors import ConfigError
from fxquant.validate import reject_unknown_fields

__all__ = ["TvmOptions", "ArmOptions", "DEFAULT_BITSERIAL_MAX_BITS", "KERNELS", "COST_MODELS", "ARM_CPUS"]

#: above this many bits (weights or activations) the bit-serial kernel is never offered (8 allows every layer:
#: the cost model then decides where bit-serial pays off)
DEFAULT_BITSERIAL_MAX_BITS = 8
#: integer-layer kernel families: "auto" lets the cost model pick the cheapest exact one per layer
KERNELS = ("auto", "bitserial", "dot", "direct")
#: how "auto" ranks kernels: "measure" times each candidate on this host (cached on disk), "model" uses the
#: static instruction-throughput model of the target (the only choice for a target this host cannot run)
COST_MODELS = ("measure", "model")
#: named aarch64 cores for "tvm-arm" (LLVM -mcpu and features); "generic" is any ARMv8-A core with NEON
ARM_CPUS = ("generic", "cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1")


def _check_kernel_choice(value: Any) -> Any:
    """``kernel`` is one family for every layer, or ``{layer name or glob: family}`` (unlisted layers: auto)."""
    if isinstance(value, str):
        if value not in KERNELS:
            raise ConfigError(f"kernel={value!r} is invalid: expected one of {', '.join(KERNELS)} or a dict")
        return value
    if isinstance(value, Mapping):
        for key, kind in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"kernel: layer key {key!r} is invalid: expected a layer name or glob")
            if kind not in KERNELS:
                raise ConfigError(f"kernel[{key!r}]={kind!r} is invalid: expected one of {', '.join(KERNELS)}")
        return dict(value)
    raise ConfigError(f"kernel={value!r} is invalid: expected one of {', '.join(KERNELS)} or a dict")


@dataclass(frozen=True)
class TvmOptions:
    """Options shared by ``"tvm-llvm"`` and ``"tvm-arm"``.

    ``example_inputs`` fixes the input shapes when the graph carries no ``tensor_meta``; ``bitserial_max_bits``
    is the largest weight/activation bitwidth sent to the bit-serial kernel; ``bitserial=False`` turns that
    kernel off; ``debug_accumulators`` adds every integer layer's int32 accumulator as an extra output;
    ``target`` replaces (key by key) the target dict the backend picks. ``kernel`` forces a kernel family
    globally or per layer (``{"layer4.*": "dot"}``); ``cost_model`` says how ``"auto"`` ranks them;
    ``num_threads`` sets the compiled module's thread pool (default: every core). ``batch_sizes=(1, 8)``
    compiles one function per batch size into the same build (the first is ``main``, the others
    ``main_b<N>``); a batch of another size runs in pieces of those (:mod:`fxquant.batching`).
    """

    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None
    bitserial_max_bits: int = DEFAULT_BITSERIAL_MAX_BITS
    bitserial: bool = True
    debug_accumulators: bool = False
    target: Mapping[str, Any] | None = None
    kernel: str | Mapping[str, str] = "auto"
    cost_model: str = "measure"
    num_threads: int | None = None
    batch_sizes: Sequence[int] | None = None

    def __post_init__(self) -> None:
        bits = self.bitserial_max_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 8:
            raise ConfigError(f"bitserial_max_bits={bits!r} is invalid: expected an integer from 0 to 8")
        for flag in ("bitserial", "debug_accumulators"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} is invalid: expected True or False")
        object.__setattr__(self, "kernel", _check_kernel_choice(self.kernel))
        if self.cost_model not in COST_MODELS:
            raise ConfigError(f"cost_model={self.cost_model!r} is invalid: expected one of {', '.join(COST_MODELS)}")
        threads = self.num_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"num_threads={threads!r} is invalid: expected a positive integer or None")
        if self.target is not None and not isinstance(self.target, Mapping):
            raise ConfigError(f"target={self.target!r} is invalid: expected a dict such as {{'kind': 'llvm'}}")
        inputs = self.example_inputs
        if inputs is not None:
            items = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            if not all(isinstance(t, torch.Tensor) for t in items):
                raise ConfigError("example_inputs must be a tensor or a sequence of tensors")
            object.__setattr__(self, "example_inputs", items)
        if self.batch_sizes is not None:
            object.__setattr__(self, "batch_sizes", check_batch_sizes(self.batch_sizes))

    @classmethod
    def parse(cls, backend: str, options: Mapping[str, Any]) -> TvmOptions:
        """Build from ``convert()`` keyword options; an unknown key names the allowed ones."""
        reject_unknown_fields(cls, options, f"backend {backend!r}: unknown option(s)")
        return cls(**options)


@dataclass(frozen=True)
class ArmOptions(TvmOptions):
    """``"tvm-arm"`` adds where to write the artifact folder, whether an existing one may be replaced, and the
    core to generate code for (``cpu``: LLVM's scheduling model and features such as ``+dotprod``). Its
    kernel choice always uses the static model: this host cannot time aarch64 code."""

    output_dir: str | Path | None = None
    force: bool = False
    cpu: str = "generic"
    cost_model: str = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cpu not in ARM_CPUS:
            raise ConfigError(f"cpu={self.cpu!r} is invalid: expected one of {', '.join(ARM_CPUS)}")
        if self.cost_model != "model":
            raise ConfigError("backend 'tvm-arm': cost_model must be 'model' (aarch64 code cannot be timed here)")
        if self.output_dir is None or str(self.output_dir) == "":
            raise ConfigError("backend 'tvm-arm' needs output_dir=PATH (the artifact folder to write)")
        if not isinstance(self.output_dir, str | Path):
            raise ConfigError(f"output_dir={self.output_dir!r} is invalid: expected a path")
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if not isinstance(self.force, bool):
            raise ConfigError(f"force={self.force!r} is invalid: expected True or False")
