"""The ``"tvm-llvm"`` result: a compiled Relax VM wrapped as an ``nn.Module`` that takes and returns tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from fxquant.backends.tvm.lower import LoweredFunction, TensorSpec
from fxquant.backends.tvm.manifest import report
from fxquant.batching import run_in_batches
from fxquant.errors import BackendError, InputError
from fxquant.input_guard import check_finite
from fxquant.tvm_host import check_threads, default_threads, ensure_pool_size

__all__ = ["TvmModule", "check_inputs"]


def _shape_mismatch(spec: TensorSpec, x: torch.Tensor) -> str | None:
    got_dtype = str(x.dtype).removeprefix("torch.")
    if tuple(x.shape) != spec.shape or got_dtype != spec.dtype:
        return f"expected shape {spec.shape} {spec.dtype}, got {tuple(x.shape)} {got_dtype}"
    return None


def check_inputs(specs: list[TensorSpec], inputs: tuple[Any, ...]) -> None:
    """Fail with the expected and the received shape/dtype of the first wrong input."""
    _check_count(specs, inputs)
    for spec, x in zip(specs, inputs, strict=True):
        problem = _shape_mismatch(spec, x)
        if problem:
            raise InputError(
                f"input {spec.name!r}: {problem} (the model is compiled for static shapes; for another batch size "
                "convert again with fxquant.convert(qmodel, backend, example_inputs=(torch.zeros(N, ...),)) or "
                "with batch_sizes=(1, N, ...))"
            )
        check_finite(x, f"input {spec.name!r}")


def _check_count(specs: list[TensorSpec], inputs: tuple[Any, ...]) -> None:
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputError(f"expected {len(specs)} input tensor(s) ({names}), got {len(inputs)}")
    for spec, x in zip(specs, inputs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {spec.name!r}: expected a torch.Tensor, got {type(x).__name__}")


class TvmModule(nn.Module):
    """Compiled model for this host: ``out = mod(x)``; ``mod.manifest`` and ``mod.report()`` say what ran.

    Built with ``batch_sizes``, a batch of a compiled size runs its own function and any other batch runs in
    pieces of those sizes (:mod:`fxquant.batching`); built without, only the ``example_inputs`` shape runs.
    With ``debug_accumulators=True`` at convert time, :meth:`run_with_accumulators` also returns each integer
    layer's int32 accumulator, by layer name. ``mod.num_threads = n`` sizes TVM's thread pool for the next
    calls (``None``: every CPU); it does not depend on ``TVM_NUM_THREADS`` at import.
    """

    def __init__(self, executable: tvm.runtime.Executable, manifest: dict[str, Any],
                 functions: list[LoweredFunction], num_threads: int | None = None):
        super().__init__()
        self.num_threads = num_threads
        self.executable = executable
        self.manifest = manifest
        self._functions = list(functions)
        self._vm = relax.VirtualMachine(executable, tvm.cpu())
        self._calls = {f.name: self._vm[f.name] for f in self._functions}
        self._sizes = [f.batch for f in self._functions]
        self._split = bool(manifest.get("options", {}).get("batch_sizes"))

    @property
    def batch_sizes(self) -> list[int | None]:
        """The compiled batch sizes (the first is ``main``'s)."""
        return list(self._sizes)

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, threads: int | None) -> None:
        self._num_threads = check_threads(threads) or default_threads()

    def report(self) -> str:
        """Which kernel each layer got and why (see :func:`fxquant.backends.tvm.manifest.report`)."""
        return report(self.manifest)

    def _function_for(self, inputs: tuple[Any, ...]) -> LoweredFunction | None:
        """The compiled function whose input shapes these are; None if none is (another batch size)."""
        main = self._functions[0]
        _check_count(main.inputs, inputs)
        for function in self._functions:
            if not any(_shape_mismatch(s, x) for s, x in zip(function.inputs, inputs, strict=True)):
                return function
        return None

    def _call(self, function: LoweredFunction, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(x.detach().cpu().numpy())) for x in inputs]
        ensure_pool_size(self.num_threads)
        result = self._calls[function.name](*args)
        items = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        expected = len(function.outputs) + len(function.accumulators)
        if len(items) != expected:
            raise BackendError(f"compiled model returned {len(items)} value(s), expected {expected}")
        return [torch.from_numpy(item.numpy()) for item in items]

    def _run(self, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
        function = self._function_for(inputs)
        if function is None and not self._split:
            check_inputs(self._functions[0].inputs, inputs)  # raises: one static shape
        for spec, x in zip(self._functions[0].inputs, inputs, strict=True):
            check_finite(x, f"input {spec.name!r}")
        if function is not None:
            return self._call(function, list(inputs))
        self._check_non_batch_dims(inputs)
        by_size = {f.batch: f for f in self._functions}
        return run_in_batches(lambda chunk: self._call(by_size[int(chunk[0].shape[0])], chunk), inputs,
                              list(by_size))

    def _check_non_batch_dims(self, inputs: tuple[Any, ...]) -> None:
        for spec, x in zip(self._functions[0].inputs, inputs, strict=True):
            got_dtype = str(x.dtype).removeprefix("torch.")
            if tuple(x.shape[1:]) != spec.shape[1:] or got_dtype != spec.dtype:
                raise InputError(
                    f"input {spec.name!r}: expected shape (N, {', '.join(map(str, spec.shape[1:]))}) {spec.dtype} "
                    f"with N any batch size (compiled: {', '.join(map(str, self._sizes))}), got "
                    f"{tuple(x.shape)} {got_dtype}"
                )

    def _structure(self, values: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = values[: len(self._functions[0].outputs)]
        return tuple(outs) if self._functions[0].output_is_tuple else outs[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self._structure(self._run(inputs))

    def run_with_accumulators(
        self, *inputs: torch.Tensor
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Outputs plus ``{layer name: int32 accumulator}`` (needs ``debug_accumulators=True``)."""
        accs_specs = self._functions[0].accumulators
        if not accs_specs:
            raise BackendError("accumulators are only returned when converted with debug_accumulators=True")
        values = self._run(inputs)
        accs = values[len(self._functions[0].outputs) :]
        return self._structure(values), {s.name: a for s, a in zip(accs_specs, accs, strict=True)}
