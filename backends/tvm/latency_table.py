"""What each quantized layer costs on a named target at every candidate bit-width: the table a latency budget
searches against.

For every layer of a prepared graph and every ``(weight bits, activation bits)`` pair the search may pick,
the layer is frozen at those bits (:meth:`~fxquant.layers.QuantLayer.freeze`, its own weights and input
grid) and priced by exactly the code ``convert`` runs for it (:func:`~.integer_layers.choose_layer_kernel`):
the cheapest exact kernel among bit-serial / dot / direct under the target's cost model, and that kernel's
cost. Targets:

- ``"host"``: ``cost_model="measure"`` times each candidate on this machine through
  :class:`~.cost.HostTimer` (its disk cache makes a second table free); ``"model"`` uses the
  :class:`~.cost.StaticModel`, no compilation.
- a named aarch64 core (:data:`~.arm_cores.ARM_CORES`): the static model with the llvm-mca based bit-serial
  estimate of :mod:`.arm_estimate`, single-thread, as ``convert(backend="tvm-arm", cpu=...)`` chooses.

The table covers the integer layers' kernels, the part the bit-widths change; quantize/rescale elementwise
work and float layers are not in it (docs/kernels.md states the measured gap to a whole converted model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from tqdm.auto import tqdm
from tvm import relax

from fxquant.backends.tvm.build import arm_target_dict, host_target_dict, make_target
from fxquant.backends.tvm.context import LoweringContext
from fxquant.backends.tvm.cost import HostTimer, StaticModel, host_identity
from fxquant.backends.tvm.direct import DIRECT_VERSION
from fxquant.backends.tvm.integer_layers import choose_layer_kernel, layer_geometry
from fxquant.backends.tvm.kernels.dot import KERNEL_VERSION as DOT_VERSION
from fxquant.backends.tvm.options import TvmOptions
from fxquant.backends.tvm.selection import bitserial_module
from fxquant.errors import ConfigError
from fxquant.layers import QuantLayer
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes

__all__ = ["LatencyTable", "build_latency_table", "TABLE_VERSION", "pair_key", "parse_pair_key"]

#: bumped when what the table prices changes (its cost-model version also names the kernel versions)
TABLE_VERSION = "fxquant.latency_table/1"

BitsPair = tuple[int, int]


def pair_key(pair: BitsPair) -> str:
    """``(4, 8)`` -> ``"w4a8"``: the JSON key of a bit-width pair."""
    return f"w{pair[0]}a{pair[1]}"


def parse_pair_key(key: str) -> BitsPair:
    w, _, a = key[1:].partition("a")
    return int(w), int(a)


@dataclass(frozen=True)
class LatencyTable:
    """Per layer and bit-width pair: milliseconds of the kernel ``convert`` would choose, and which kernel."""

    target: str
    cost_model: str
    version: str
    threads: int
    batch: int
    latency_ms: Mapping[str, Mapping[BitsPair, float]]
    kernels: Mapping[str, Mapping[BitsPair, str]] = field(default_factory=dict)

    def cost(self, layer: str, pair: BitsPair) -> float:
        try:
            return self.latency_ms[layer][pair]
        except KeyError:
            raise ConfigError(
                f"latency table has no entry for layer {layer!r} at {pair_key(pair)} (target {self.target})"
            ) from None

    def total_ms(self, bits: Mapping[str, BitsPair]) -> float:
        """The estimated kernel latency of a plan (``layer -> (weight bits, activation bits)``)."""
        return float(sum(self.cost(name, pair) for name, pair in bits.items()))

    def describe(self) -> dict[str, Any]:
        """What a plan records about the table it was searched against (without the per-layer rows)."""
        return {"target": self.target, "cost_model": self.cost_model, "version": self.version,
                "threads": self.threads, "batch": self.batch}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.describe(),
            "latency_ms": {n: {pair_key(p): v for p, v in rows.items()} for n, rows in self.latency_ms.items()},
            "kernels": {n: {pair_key(p): v for p, v in rows.items()} for n, rows in self.kernels.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        def rows(key: str) -> dict[str, dict[BitsPair, Any]]:
            return {n: {parse_pair_key(k): v for k, v in r.items()} for n, r in data.get(key, {}).items()}

        return cls(data["target"], data["cost_model"], data["version"], int(data["threads"]), int(data["batch"]),
                   rows("latency_ms"), rows("kernels"))


def _context(target: str, cost_model: str, threads: int) -> tuple[Any, Any, TvmOptions, str]:
    """(tvm target, cost model, options, identity of what is priced) as ``convert`` sets them up."""
    if target == "host":
        tvm_target = make_target(host_target_dict(), None)
        static = StaticModel(tvm_target, threads)
        cost = HostTimer(tvm_target, threads) if cost_model == "measure" else static
        prior = static if cost_model == "measure" else None
        return tvm_target, (cost, prior), TvmOptions(cost_model=cost_model, num_threads=threads), host_identity()
    tvm_target = make_target(arm_target_dict(target), None)
    # the selection reads only the kernel options, which tvm-arm shares with tvm-llvm
    return tvm_target, (StaticModel(tvm_target, 1, target), None), TvmOptions(cost_model="model"), f"aarch64 {target}"


def _reads_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a graph input; the others are build-time constants that ``convert``
    folds (Swin v2's position-bias MLP), so their layers cost nothing when the model runs."""
    variable: set[fx.Node] = set()
    for node in gm.graph.nodes:  # topological order
        if node.op == "placeholder" or any(arg in variable for arg in node.all_input_nodes):
            variable.add(node)
    return variable


def _set_bits(qlayer: QuantLayer, pair: BitsPair) -> None:
    for quantizer, bits in zip((qlayer.weight_quant, qlayer.input_quant), pair, strict=True):
        if hasattr(quantizer, "set_bits"):
            quantizer.set_bits(bits)
        else:
            quantizer.bits = bits


def build_latency_table(
    gm: fx.GraphModule,
    pairs: Mapping[str, Iterable[BitsPair]],
    target: str = "host",
    cost_model: str = "measure",
    threads: int = 1,
    batch: int = 1,
    progress: bool = True,
) -> LatencyTable:
    """Price every ``pairs[layer]`` bit-width pair of the quantized layers of ``gm`` (prepared with example
    inputs, so that its nodes carry traced shapes) on ``target``; a batch of ``batch`` samples.

    Example::

        table = build_latency_table(gm, {"conv1": [(8, 8)], "layer1.0.conv1": [(w, 4) for w in range(1, 9)]},
                                    target="cortex-a76", cost_model="model")
    """
    if target != "host":
        threads = 1  # aarch64 estimates are per core, as convert(backend="tvm-arm") makes them
    tvm_target, (cost, prior), options, identity = _context(target, cost_model, threads)
    module = bitserial_module()
    modules = dict(gm.named_modules())
    nodes = {str(n.target): n for n in quant_layer_nodes(gm)}
    variable = _reads_inputs(gm)
    unknown = sorted(set(pairs) - set(nodes))
    if unknown:
        raise ConfigError(f"latency table: no quantized layer named {unknown}; layers are {sorted(nodes)}")
    work = [(name, tuple(pair)) for name in nodes if name in pairs for pair in sorted(set(pairs[name]))]
    latency: dict[str, dict[BitsPair, float]] = {}
    kernels: dict[str, dict[BitsPair, str]] = {}
    bar = tqdm(total=len(work), desc=f"latency table ({target}, {cost_model})", disable=not progress, leave=False,
               dynamic_ncols=True)
    for name in (n for n in nodes if n in pairs):
        node = nodes[name]
        meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if meta is None:
            raise ConfigError(f"layer {name!r} has no traced input shape; prepare the model with example_inputs")
        shape = (batch, *(int(s) for s in meta.shape[1:]))
        if isinstance(modules[name].layer, nn.Linear) and len(shape) > 2:  # tokens are rows, as convert lowers them
            shape = (math.prod(shape[:-1]), shape[-1])
        constant = node.args[0] not in variable
        work_copy = copy.deepcopy(modules[name])
        # one context per layer: its kernels are built once per geometry and reused across bit-widths
        ctx = LoweringContext(relax.BlockBuilder(), {}, tvm_target, options, module, cost, prior)
        for pair in sorted(set(pairs[name])):
            _set_bits(work_copy, pair)
            layer = work_copy.freeze(f"{name}@{pair_key(pair)}")  # distinct name: plans are per layer name
            geom = layer_geometry(layer, shape)
            choice = choose_layer_kernel(ctx, layer, geom, shape, name, constant)
            us = choice.costs_us.get(choice.kind)
            if constant:  # computed while building
                us = 0.0
            elif us is None:  # a single candidate is not compared, so it was not priced
                us = cost.cost_us(choice.plan, layer, geom)
            latency.setdefault(name, {})[pair] = round(us / 1e3, 6)
            kernels.setdefault(name, {})[pair] = f"{choice.kind}:{choice.plan.detail}"
            bar.update(1)
    bar.close()
    bitserial_version = getattr(module, "KERNEL_VERSION", "bitserial") if module is not None else "none"
    version = (f"{TABLE_VERSION}; {cost.name} on {identity}; kernels dot={DOT_VERSION} direct={DIRECT_VERSION} "
               f"bitserial={bitserial_version}")
    return LatencyTable(target, cost_model, version, threads, batch, latency, kernels)
