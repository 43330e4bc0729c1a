"""Which kernel each integer layer gets, and why: the decision the manifest and ``report()`` show.

Every layer has up to three exact candidates (gathered by the integer-layer converter): ``"bitserial"``
(popcounts over bit planes, when the kernel module is installed and accepts the layer), ``"dot"`` (int8/int16
dot-product instructions, ``groups == 1``) and ``"direct"`` (int32 multiply-adds, any layer).
:func:`choose_kernel` takes the one the user forced for that layer (``kernel=`` option, globally or by layer
name/glob), else the cheapest under the cost model (:mod:`fxquant.backends.tvm.cost`). A forced kernel that
cannot compute the layer is an error naming the layer, never a silent substitute.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

from fxquant.backends.tvm.cost import KernelMismatch, KernelPlan
from fxquant.errors import BackendError
from fxquant.integer import FrozenConv2d, FrozenLayer

__all__ = [
    "KernelChoice",
    "choose_kernel",
    "forced_kernel",
    "bitserial_module",
    "bitserial_problem",
    "BITSERIAL_MODULE",
    "weight_storage_dtype",
    "value_ranges",
]

BITSERIAL_MODULE = "fxquant.backends.tvm.kernels.bitserial"
#: a candidate whose modelled cost exceeds this multiple of the fastest timed one is not timed
_PRUNE = 6.0
_REQUIRED = ("bitserial_supported", "pack_weights", "conv2d_primfunc", "dense_primfunc")


@dataclass(frozen=True)
class KernelChoice:
    """``kind`` is "bitserial", "dot", "direct" or "float"; ``reason`` says why; ``costs_us`` what each cost."""

    kind: str
    reason: str
    costs_us: dict[str, float] = field(default_factory=dict)
    plan: KernelPlan | None = None


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


def weight_storage_dtype(layer: FrozenLayer) -> str:
    """int8 when every weight integer fits, else int32 (bipolar 8-bit weights reach ±255)."""
    low, high = value_ranges(layer)[1]
    return "int8" if -128 <= low and high <= 127 else "int32"


def value_ranges(layer: FrozenLayer) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest, highest) integer the kernel multiplies on the activation side and on the weight side."""
    table = layer.input_levels_int
    if table is None:
        data = (0, 2**layer.act_bits - 1)
    else:
        data = (min(0, int(table.min())), int(table.max()))
    weights = layer.weight_int
    return data, (int(weights.min()), int(weights.max()))


def bitserial_problem(layer: FrozenLayer, *, enabled: bool, max_bits: int, module: ModuleType | None) -> str | None:
    """Why the bit-serial kernel cannot take ``layer`` (None: it can)."""
    if not enabled:
        return "bit-serial kernel disabled (bitserial=False)"
    if module is None:
        return f"bit-serial kernels not installed ({BITSERIAL_MODULE} missing)"
    if layer.input_levels_int is not None:
        return "codebook input levels need a lookup before accumulation, not bit-planes of codes"
    if max(layer.weight_bits, layer.act_bits) > max_bits:
        return f"weight_bits={layer.weight_bits}/act_bits={layer.act_bits} above bitserial_max_bits={max_bits}"
    accepts_limit = "max_bits" in inspect.signature(module.bitserial_supported).parameters
    ok, why = module.bitserial_supported(layer, **({"max_bits": max_bits} if accepts_limit else {}))
    return None if ok else f"bit-serial kernel declined: {why}"


def dot_problem(layer: FrozenLayer) -> str | None:
    """Why the dot-product kernel cannot take ``layer`` (None: it can)."""
    if isinstance(layer, FrozenConv2d) and layer.groups != 1:
        return f"groups={layer.groups} (the dot-product kernel takes groups=1)"
    (dlo, dhi), (wlo, whi) = value_ranges(layer)
    if min(dlo, wlo) < -(2**15) or max(dhi, whi) >= 2**15:
        return f"values {dlo}..{dhi} x weights {wlo}..{whi} exceed 16-bit operands"
    return None


def forced_kernel(kernel: str | Mapping[str, str], layer_name: str) -> str:
    """The family the ``kernel=`` option asks for this layer: exact name first, then the first matching glob."""
    if isinstance(kernel, str):
        return kernel
    if layer_name in kernel:
        return kernel[layer_name]
    for pattern, kind in kernel.items():
        if fnmatch.fnmatchcase(layer_name, pattern):
            return kind
    return "auto"


def choose_kernel(
    layer_name: str,
    plans: dict[str, KernelPlan],
    declined: dict[str, str],
    forced: str,
    cost: Callable[[KernelPlan], float],
    cost_model: str,
    prior: Callable[[KernelPlan], float] | None = None,
) -> KernelChoice:
    """The forced plan, else the cheapest that computes exactly; ``declined`` says why the others are absent.

    With a ``prior`` (the static model), candidates are timed cheapest-first and one modelled at more than
    ``_PRUNE`` times the fastest timed so far is not built at all (an 8-bit layer's bit-serial kernel, say).
    """
    if forced != "auto":
        if forced not in plans:
            why = declined.get(forced, "not available for this layer")
            raise BackendError(f"layer {layer_name}: kernel={forced!r} was forced but cannot run it: {why}")
        return KernelChoice(forced, f"forced (kernel={forced!r})", {}, plans[forced])
    costs: dict[str, float] = {}
    modelled = {kind: prior(plan) for kind, plan in plans.items()} if prior is not None else None
    order = sorted(plans, key=modelled.__getitem__) if modelled is not None else list(plans)
    for kind in order if len(plans) > 1 else ():
        if modelled is not None and costs and modelled[kind] > _PRUNE * min(costs.values()):
            declined[kind] = f"modelled at {modelled[kind]:g} us, over {_PRUNE}x the fastest (not timed)"
            continue
        try:
            costs[kind] = cost(plans[kind])
        except KernelMismatch as exc:
            warnings.warn(f"layer {layer_name}: {exc}; not used", RuntimeWarning, stacklevel=2)
            declined[kind] = str(exc)
    usable = {k: p for k, p in plans.items() if k not in declined}
    if not costs:
        kind = next(iter(usable))
        return KernelChoice(kind, _explain(kind, {}, declined, cost_model), {}, usable[kind])
    kind = min(costs, key=lambda k: (costs[k], k))
    return KernelChoice(kind, _explain(kind, costs, declined, cost_model), costs, usable[kind])


def _explain(kind: str, costs: dict[str, float], declined: dict[str, str], cost_model: str) -> str:
    parts = []
    if costs:
        ranked = ", ".join(f"{k} {v:g} us" for k, v in sorted(costs.items(), key=lambda kv: kv[1]))
        parts.append(f"cheapest by {cost_model}: {ranked}")
    parts += [f"no {k}: {why}" for k, why in sorted(declined.items())]
    return "; ".join(parts) or "the only exact kernel for this layer"

