"""Which kernel each integer layer gets, and why: the decision the manifest and ``report()`` show.

``"bitserial"`` when the bit-serial kernel module is installed, the layer's bitwidths are within
``bitserial_max_bits`` and the kernel itself accepts the layer; otherwise the direct integer kernel,
``"int8"`` when codes and weights both fit 8-bit storage and ``"int32"`` when they do not. Only a missing
kernel module falls back quietly to the direct kernel (its reason says so); any other import error is raised.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType

from fxquant.errors import BackendError
from fxquant.integer import IntegerLayer

__all__ = ["KernelChoice", "select_kernel", "bitserial_module", "BITSERIAL_MODULE", "weight_storage_dtype"]

BITSERIAL_MODULE = "fxquant.backends.tvm.kernels.bitserial"
_REQUIRED = ("bitserial_supported", "pack_weights", "conv2d_primfunc", "dense_primfunc")


@dataclass(frozen=True)
class KernelChoice:
    """``kind`` is one of "bitserial", "int8", "int32", "float"; ``reason`` says why not a faster one."""

    kind: str
    reason: str


def bitserial_module() -> ModuleType | None:
    """The kernel engineer's module, or None when it is not installed (and only then)."""
    try:
        module = importlib.import_module(BITSERIAL_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name is not None and BITSERIAL_MODULE.startswith(exc.name):
            return None
        raise
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise BackendError(f"{BITSERIAL_MODULE} lacks the kernel interface function(s) {', '.join(missing)}")
    return module


def weight_storage_dtype(layer: IntegerLayer) -> str:
    """int8 when every weight integer fits, else int32 (bipolar 8-bit weights reach ±255)."""
    low, high = int(layer.weight_int.min()), int(layer.weight_int.max())
    return "int8" if -128 <= low and high <= 127 else "int32"


def _direct(layer: IntegerLayer, reason: str) -> KernelChoice:
    values = layer.input_levels_int if getattr(layer, "input_levels_int", None) is not None else None
    codes_fit = layer.act_bits <= 8 if values is None else int(values.abs().max()) <= 255
    kind = "int8" if codes_fit and weight_storage_dtype(layer) == "int8" else "int32"
    return KernelChoice(kind, reason)


def select_kernel(layer: IntegerLayer, *, enabled: bool, max_bits: int, module: ModuleType | None) -> KernelChoice:
    """Pick the kernel for one integer layer.

    Example::

        select_kernel(layer, enabled=True, max_bits=4, module=bitserial_module())
    """
    if not enabled:
        return _direct(layer, "bit-serial kernel disabled (bitserial=False)")
    if module is None:
        return _direct(layer, f"bit-serial kernels not installed ({BITSERIAL_MODULE} missing)")
    if getattr(layer, "input_levels_int", None) is not None:
        return _direct(layer, "codebook input levels need a lookup before accumulation, not bit-planes of codes")
    bits = max(layer.weight_bits, layer.act_bits)
    if bits > max_bits:
        return _direct(
            layer,
            f"weight_bits={layer.weight_bits}/act_bits={layer.act_bits} above bitserial_max_bits={max_bits}",
        )
    # the kernel may take the bitwidth limit itself; otherwise it applies its own default
    accepts_limit = "max_bits" in inspect.signature(module.bitserial_supported).parameters
    limit = {"max_bits": max_bits} if accepts_limit else {}
    ok, why = module.bitserial_supported(layer, **limit)
    if not ok:
        return _direct(layer, f"bit-serial kernel declined: {why}")
    return KernelChoice("bitserial", f"W{layer.weight_bits}A{layer.act_bits} {layer.weight_encoding} weights")
