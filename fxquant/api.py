"""The public entry points: :func:`prepare`, :func:`convert`, :func:`update_schedules`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fxquant.backends.registry import check_supported, get_backend
from fxquant.config import QuantConfig
from fxquant.errors import ConfigError, FxQuantError, NumericsError
from fxquant.input_guard import check_finite
from fxquant.layers import QuantLayer
from fxquant.passes import fold_bn, freeze, fuse_bn_for_qat, insert_quantizers, trace
from fxquant.quantizers.base import Quantizer, write_flag

__all__ = ["prepare", "convert", "update_schedules", "freeze_bn_stats", "quantizers_of", "quantized_layer_names"]


def prepare(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    config: QuantConfig | None = None,
) -> fx.GraphModule:
    """Trace ``model``, fold its batch norms and insert soft fake-quantization; returns a trainable copy.

    ``model`` itself is not modified. With ``example_inputs`` the quantizers are initialised from one
    forward pass now (eval mode, no gradient, batch-norm statistics untouched); without them, at the
    first forward the user runs.

    Example::

        qmodel = fxquant.prepare(model, (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=4, act_bits=4))
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a fxquant.QuantConfig, got {type(config).__name__}")
    return prepare_owned(copy.deepcopy(model), example_inputs, config)


def prepare_owned(
    model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None, config: QuantConfig
) -> fx.GraphModule:
    """:func:`prepare` without the copy: the result shares ``model``'s layer, batch-norm and other leaf
    modules (and so their parameters), which lets a caller that owns ``model`` read the training back."""
    training = model.training
    gm = trace(model, config.leaf_modules)
    if config.fold_bn == "qat":
        gm = fuse_bn_for_qat(gm)
    elif config.fold_bn == "inference":
        gm = fold_bn(gm.eval())
    gm = insert_quantizers(gm, config)
    gm.meta["fxquant.config"] = config
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        for i, x in enumerate(args):  # NaN calibration data would give every quantizer a NaN range
            if isinstance(x, torch.Tensor):
                check_finite(x, f"example input {i} (calibration data)")
        gm.eval()
        _record_shapes(gm, args)  # its forward pass also initialises the quantizers
    gm.train(training)
    return gm


def _record_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Store tensor shapes in ``node.meta['tensor_meta']`` (used by cost models and reports)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)


def quantizers_of(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer in a prepared model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def update_schedules(model: nn.Module, progress: float) -> None:
    """Advance every quantizer's schedule (QN temperature, DSQ alpha); call once per step or epoch.

    ``progress`` is the fraction of training done, from 0 to 1.
    """
    if not 0.0 <= progress <= 1.0:
        raise ConfigError(f"progress={progress!r} must be between 0 and 1")
    for q in quantizers_of(model).values():
        q.update_schedule(progress)


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) batch-norm statistics updates in a prepared model's fused layers.

    With frozen statistics a training step folds the running statistics into the quantized weight, as in
    eval. Freeze them for the last epochs of QAT (Jacob et al. 2018), or from the start when fine-tuning
    a trained model whose low-bit activations leave some channels constant: batch statistics of a
    constant channel divide gradients by sqrt(eps), which compounds over deep nets.
    """
    for layer in model.modules():
        if isinstance(layer, QuantLayer):
            write_flag(layer, "bn_frozen", frozen)


def convert(model: fx.GraphModule, backend: str = "torch", **options: Any) -> Any:
    """Hard-quantize a prepared model and lower it to ``backend`` (``"torch"``, ``"tvm-llvm"``, ``"tvm-arm"``).

    The frozen graph is checked against the backend's declared capabilities before lowering starts: every
    node it cannot lower is listed in one :class:`~fxquant.UnsupportedOpError`.

    Example::

        ref = fxquant.convert(qmodel, backend="torch")   # the integer-exact reference nn.Module
    """
    if not isinstance(model, fx.GraphModule) or not quantized_layer_names(model):
        raise FxQuantError("convert() expects a model returned by fxquant.prepare() with at least one quantized layer")
    lower = get_backend(backend)
    frozen = freeze(model)
    _check_finite_state(frozen)
    check_supported(backend, frozen)
    return lower(frozen, **options)


def _check_finite_state(frozen: fx.GraphModule) -> None:
    """Refuse NaN/Inf weights, scales or biases: they would convert into a model that outputs garbage."""
    for name, tensor in [*frozen.named_parameters(), *frozen.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            layer, _, field = name.rpartition(".")
            bad = int((~torch.isfinite(tensor)).sum())
            raise NumericsError(f"layer {layer or '<model>'!r}: {field} holds {bad} non-finite value(s) of "
                                f"{tensor.numel()}; the trained weights or quantizer scales are NaN/Inf, retrain "
                                "or restore a good checkpoint")
