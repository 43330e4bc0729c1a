"""Translate a frozen integer graph (``torch.fx``) into a Relax module through a converter table.

The table maps module types, functions and method names to :class:`~fxquant.backends.tvm.context.Converter`
objects (see ``elementwise``, ``structure``, ``float_layers``, ``transformer``, ``integer_layers``, and the
user's entries from :func:`register_converter`); float ops it lacks fall back to TVM's own FX importer
(``relax_frontend``). The tables are also the backends' declared capabilities (:data:`CAPABILITIES`), which
``fxquant.convert`` checks before lowering starts: all unsupported nodes are reported together in one
:class:`~fxquant.UnsupportedOpError`; :func:`lower_graph` checks them too when it is called directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import tvm
from torch import fx, nn
from tvm import relax

from fxquant.backends.registry import BackendCapabilities, node_label
from fxquant.backends.registry import unsupported_nodes as registry_unsupported_nodes
from fxquant.backends.tvm import elementwise, float_layers, integer_layers, structure, transformer
from fxquant.backends.tvm.context import Converter, LayerRecord, LoweringContext
from fxquant.backends.tvm.cost import HostTimer, StaticModel
from fxquant.backends.tvm.options import TvmOptions
from fxquant.backends.tvm.relax_frontend import tvm_converter
from fxquant.backends.tvm.selection import bitserial_module
from fxquant.errors import BackendError, ConfigError, UnsupportedOpError
from fxquant.tvm_host import default_threads

__all__ = [
    "MODULE_CONVERTERS",
    "FUNCTION_CONVERTERS",
    "METHOD_CONVERTERS",
    "NAMED_CONVERTERS",
    "TensorSpec",
    "LoweredGraph",
    "LoweredFunction",
    "converter_for",
    "register_converter",
    "unsupported_nodes",
    "node_problem",
    "CAPABILITIES",
    "input_specs",
    "lower_graph",
    "STAGE",
]

STAGE = "lowering to TVM Relax"

MODULE_CONVERTERS: dict[type, Converter] = {
    **elementwise.MODULE_CONVERTERS,
    **structure.MODULE_CONVERTERS,
    **float_layers.MODULE_CONVERTERS,
    **transformer.MODULE_CONVERTERS,
    **integer_layers.MODULE_CONVERTERS,
}
FUNCTION_CONVERTERS: dict[Callable[..., Any], Converter] = {
    **elementwise.FUNCTION_CONVERTERS,
    **structure.FUNCTION_CONVERTERS,
    **transformer.FUNCTION_CONVERTERS,
}
METHOD_CONVERTERS: dict[str, Converter] = {
    **elementwise.METHOD_CONVERTERS,
    **structure.METHOD_CONVERTERS,
    **transformer.METHOD_CONVERTERS,
}
#: module classes and functions of optional packages, by ``module.qualname``
NAMED_CONVERTERS: dict[str, Converter] = {**structure.NAMED_CONVERTERS, **transformer.NAMED_CONVERTERS}


def register_converter(
    target: type[nn.Module] | Callable[..., Any] | str,
    emit: Callable[[LoweringContext, fx.Node], Any],
    check: Callable[[fx.Node, nn.Module | None], str | None] | None = None,
    *,
    replace: bool = False,
) -> Converter:
    """Teach the TVM backends one more module type, function or method name (a user's custom layer).

    ``emit(ctx, node)`` returns the node's Relax value: read inputs with ``ctx.value(node.args[0])``, emit with
    ``ctx.bb.emit(relax.op...)``, reach the module with ``ctx.module(node)``. ``check(node, module)`` (optional)
    returns why a node cannot be lowered, or None; it runs before anything is emitted. Keep a custom module
    whole while tracing with ``QuantConfig(leaf_modules=[...])``, or it is traced through instead. An existing
    entry is only replaced with ``replace=True``.

    Example::

        register_converter(MyScale, lambda ctx, node: ctx.bb.emit(
            relax.op.multiply(ctx.value(node.args[0]), relax.const(ctx.module(node).factor, "float32"))))
    """
    if not callable(emit) or (check is not None and not callable(check)):
        raise ConfigError("register_converter: emit (and check, if given) must be callable")
    if isinstance(target, str):
        table: dict[Any, Converter] = METHOD_CONVERTERS
    elif isinstance(target, type) and issubclass(target, nn.Module):
        table = MODULE_CONVERTERS
    elif callable(target):
        table = FUNCTION_CONVERTERS
    else:
        raise ConfigError(f"register_converter: target {target!r} is not a module class, a function or a method name")
    if target in table and not replace:
        raise ConfigError(f"register_converter: {_qualified(target) if not isinstance(target, str) else target!r} "
                          "already has a converter (pass replace=True to override it)")
    converter = Converter(emit, check)
    table[target] = converter
    return converter


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of a graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class LoweredFunction:
    """One Relax function of the build (one per compiled batch size) and what its caller needs to feed it
    and to read its outputs."""

    name: str
    batch: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    output_is_tuple: bool
    accumulators: list[TensorSpec]
    layers: list[LayerRecord]


@dataclass
class LoweredGraph:
    """The Relax module and its functions: ``main`` first, then one ``main_b<N>`` per further batch size."""

    mod: tvm.IRModule
    functions: list[LoweredFunction]

    @property
    def main(self) -> LoweredFunction:
        return self.functions[0]


def _own_converter(node: fx.Node, module: nn.Module | None) -> Converter | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in MODULE_CONVERTERS:
                return MODULE_CONVERTERS[cls]
            if _qualified(cls) in NAMED_CONVERTERS:
                return NAMED_CONVERTERS[_qualified(cls)]
        return None
    if node.op == "call_function":
        try:
            found = FUNCTION_CONVERTERS.get(node.target)
        except TypeError:  # unhashable target
            found = None
        return found if found is not None else NAMED_CONVERTERS.get(_qualified(node.target))
    if node.op == "call_method":
        return METHOD_CONVERTERS.get(str(node.target))
    return None


def converter_for(node: fx.Node, modules: dict[str, nn.Module]) -> Converter | None:
    """The table entry of a call node (module types match along the class hierarchy), else TVM's importer's."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    own = _own_converter(node, module)
    return own if own is not None else tvm_converter(node, module)


def _output_nodes(node: fx.Node) -> tuple[list[Any], bool]:
    value = node.args[0]
    if isinstance(value, tuple | list):
        return list(value), True
    return [value], False


def node_problem(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Why the TVM backends cannot lower ``node`` (None: they can): the converter tables as a check."""
    if node.op == "placeholder":
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "dtype") and meta.dtype != torch.float32:
            return f"input dtype {meta.dtype} (only float32 inputs)"
        return None
    if node.op == "get_attr":
        return None
    if node.op == "output":
        values, _ = _output_nodes(node)
        if not all(isinstance(v, fx.Node) for v in values):
            return "outputs must be a tensor or a flat tuple of tensors"
        return None
    converter = converter_for(node, modules)
    if converter is None:
        return "no converter"
    return converter.unsupported_reason(node, modules.get(str(node.target)) if node.op == "call_module" else None)


#: what the TVM backends lower: the integer-layer kinds of their converters and every node their tables take
CAPABILITIES = BackendCapabilities(layer_kinds=integer_layers.LAYER_KINDS, node_problem=node_problem, stage=STAGE)


def unsupported_nodes(gm: fx.GraphModule) -> list[str]:
    """Every node the TVM backends cannot lower, each with the reason (their :data:`CAPABILITIES` checked)."""
    return registry_unsupported_nodes(CAPABILITIES, gm)


def input_specs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None) -> list[TensorSpec]:
    """Input shapes from ``tensor_meta`` (recorded by ``prepare`` with example inputs), else ``example_inputs``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None:
        if len(example_inputs) != len(placeholders):
            raise BackendError(
                f"example_inputs has {len(example_inputs)} tensor(s) but the graph has {len(placeholders)} input(s)"
            )
        return [
            TensorSpec(n.name, tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))
            for n, t in zip(placeholders, example_inputs, strict=True)
        ]
    specs = []
    for n in placeholders:
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise BackendError(
                f"input {n.name!r} has no recorded shape: pass example_inputs to fxquant.prepare(), or "
                "example_inputs=(x,) to convert()"
            )
        specs.append(TensorSpec(n.name, tuple(int(s) for s in meta.shape), str(meta.dtype).removeprefix("torch.")))
    return specs


def _spec(name: str, expr: relax.Expr) -> TensorSpec:
    info = expr.ty
    return TensorSpec(name, tuple(int(d) for d in info.shape.values), str(info.dtype))


def _attr_value(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    if isinstance(value, torch.Tensor):
        return relax.const(value.detach().cpu().numpy())
    return value


def _translate(ctx: LoweringContext, gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "get_attr":
        return _attr_value(gm, str(node.target))
    converter = converter_for(node, ctx.modules)
    assert converter is not None  # checked before translation
    try:
        return converter.emit(ctx, node)
    except NotImplementedError as exc:
        raise UnsupportedOpError(STAGE, [f"{node_label(node, ctx.modules)}: {exc}"]) from exc
    except (UnsupportedOpError, BackendError):
        raise
    except Exception as exc:
        raise BackendError(f"{STAGE}: node {node_label(node, ctx.modules)} failed: {exc}") from exc


def _with_batch(specs: list[TensorSpec], batch: int) -> list[TensorSpec]:
    """``specs`` with the leading (batch) dimension set to ``batch``."""
    scalar = [s.name for s in specs if not s.shape]
    if scalar:
        raise ConfigError(f"batch_sizes: input {scalar[0]!r} has no leading batch dimension")
    return [TensorSpec(s.name, (batch, *s.shape[1:]), s.dtype) for s in specs]


def _lower_function(
    gm: fx.GraphModule, name: str, inputs: list[TensorSpec], ctx: LoweringContext
) -> LoweredFunction:
    """The graph as the Relax function ``name`` of ``ctx.bb``, for inputs of exactly these shapes."""
    bb = ctx.bb
    params = [relax.Var(s.name, relax.TensorType(s.shape, s.dtype)) for s in inputs]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ctx.env.update(zip(placeholders, params, strict=True))
    out_nodes, is_tuple = _output_nodes(next(n for n in gm.graph.nodes if n.op == "output"))
    with bb.function(name, params):
        with bb.dataflow():
            for node in gm.graph.nodes:
                if node.op not in ("placeholder", "output"):
                    ctx.env[node] = _translate(ctx, gm, node)
            values = [ctx.env[n] for n in out_nodes]
            bad = [n.name for n, v in zip(out_nodes, values, strict=True) if not isinstance(v, relax.Expr)]
            if bad:
                raise UnsupportedOpError(STAGE, [f"output {out}: not a tensor" for out in bad])
            outputs = [_spec(n.name, v) for n, v in zip(out_nodes, values, strict=True)]
            results = values + [acc for _, acc in ctx.accumulators]
            result = bb.emit_output(relax.Tuple(results) if len(results) > 1 else results[0])
        bb.emit_func_output(result)
    accumulators = [_spec(acc_name, acc) for acc_name, acc in ctx.accumulators]
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return LoweredFunction(name, batch, inputs, outputs, is_tuple, accumulators, ctx.layers)


def lower_graph(gm: fx.GraphModule, options: TvmOptions, target: tvm.target.Target) -> LoweredGraph:
    """The frozen graph as a Relax ``main`` taking the inputs and returning the outputs (then accumulators),
    plus a ``main_b<N>`` for every further size in ``options.batch_sizes``.

    Example::

        lowered = lower_graph(fxquant.passes.freeze(qmodel), TvmOptions(), host_target())
    """
    problems = unsupported_nodes(gm)
    if problems:
        raise UnsupportedOpError(STAGE, problems)
    inputs = input_specs(gm, options.example_inputs)
    for spec in inputs:
        if spec.dtype != "float32":
            raise BackendError(f"input {spec.name!r}: dtype {spec.dtype} is not supported (only float32)")
    bb = relax.BlockBuilder()
    threads = options.num_threads or default_threads()
    arm_cpu = getattr(options, "cpu", None)  # tvm-arm: estimates are per core (one thread) of that CPU
    static = StaticModel(target, 1 if arm_cpu else threads, arm_cpu)
    if options.cost_model == "measure":
        cost: HostTimer | StaticModel = HostTimer(target, threads)
        prior: StaticModel | None = static
    else:
        cost, prior = static, None
    sizes = options.batch_sizes or (None,)
    functions = []
    for index, batch in enumerate(sizes):
        ctx = LoweringContext(bb, dict(gm.named_modules()), target, options, bitserial_module(), cost, prior)
        name = "main" if index == 0 else f"main_b{batch}"
        specs = inputs if batch is None else _with_batch(inputs, batch)
        functions.append(_lower_function(gm, name, specs, ctx))
    return LoweredGraph(bb.get(), functions)
