"""The ``"tvm-llvm"`` result: a compiled Relax VM wrapped as an ``nn.Module`` that takes and returns tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from fxquant.backends.tvm.lower import TensorSpec
from fxquant.backends.tvm.manifest import report
from fxquant.errors import BackendError, InputError
from fxquant.input_guard import check_finite
from fxquant.tvm_host import check_threads, default_threads, ensure_pool_size

__all__ = ["TvmModule", "check_inputs"]


def check_inputs(specs: list[TensorSpec], inputs: tuple[Any, ...]) -> None:
    """Fail with the expected and the received shape/dtype of the first wrong input."""
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputError(f"expected {len(specs)} input tensor(s) ({names}), got {len(inputs)}")
    for spec, x in zip(specs, inputs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {spec.name!r}: expected a torch.Tensor, got {type(x).__name__}")
        got_dtype = str(x.dtype).removeprefix("torch.")
        if tuple(x.shape) != spec.shape or got_dtype != spec.dtype:
            raise InputError(
                f"input {spec.name!r}: expected shape {spec.shape} {spec.dtype}, got {tuple(x.shape)} {got_dtype} "
                "(the model is compiled for static shapes; for another batch size convert again with "
                "fxquant.convert(qmodel, backend, example_inputs=(torch.zeros(N, ...),)))"
            )
        check_finite(x, f"input {spec.name!r}")


class TvmModule(nn.Module):
    """Compiled model for this host: ``out = mod(x)``; ``mod.manifest`` and ``mod.report()`` say what ran.

    With ``debug_accumulators=True`` at convert time, :meth:`run_with_accumulators` also returns each integer
    layer's int32 accumulator, by layer name. ``mod.num_threads = n`` sizes TVM's thread pool for the next
    calls (``None``: every CPU); it does not depend on ``TVM_NUM_THREADS`` at import.
    """

    def __init__(self, executable: tvm.runtime.Executable, manifest: dict[str, Any], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], output_is_tuple: bool, accumulators: list[TensorSpec],
                 num_threads: int | None = None):
        super().__init__()
        self.num_threads = num_threads
        self.executable = executable
        self.manifest = manifest
        self._inputs, self._outputs, self._tuple, self._accs = inputs, outputs, output_is_tuple, accumulators
        self._vm = relax.VirtualMachine(executable, tvm.cpu())
        self._main = self._vm["main"]

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, threads: int | None) -> None:
        self._num_threads = check_threads(threads) or default_threads()

    def report(self) -> str:
        """Which kernel each layer got and why (see :func:`fxquant.backends.tvm.manifest.report`)."""
        return report(self.manifest)

    def _run(self, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
        check_inputs(self._inputs, inputs)
        args = [tvm.runtime.tensor(np.ascontiguousarray(x.detach().cpu().numpy())) for x in inputs]
        ensure_pool_size(self.num_threads)
        result = self._main(*args)
        items = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        expected = len(self._outputs) + len(self._accs)
        if len(items) != expected:
            raise BackendError(f"compiled model returned {len(items)} value(s), expected {expected}")
        return [torch.from_numpy(item.numpy()) for item in items]

    def _structure(self, values: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = values[: len(self._outputs)]
        return tuple(outs) if self._tuple else outs[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self._structure(self._run(inputs))

    def run_with_accumulators(
        self, *inputs: torch.Tensor
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Outputs plus ``{layer name: int32 accumulator}`` (needs ``debug_accumulators=True``)."""
        if not self._accs:
            raise BackendError("accumulators are only returned when converted with debug_accumulators=True")
        values = self._run(inputs)
        accs = values[len(self._outputs) :]
        return self._structure(values), {s.name: a for s, a in zip(self._accs, accs, strict=True)}
