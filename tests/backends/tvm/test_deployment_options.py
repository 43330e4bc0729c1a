"""Deployment-time settings of a ``tvm-llvm`` module: its thread pool (set at convert time or later, not read
from ``TVM_NUM_THREADS`` at import) and its batch size (fixed by ``example_inputs``; another one is a clear error)."""

from __future__ import annotations

import pytest
import torch
import tvm

import fxquant
from fxquant.tvm_host import default_threads
from tests.backends.tvm.helpers import ResidualNet, quantized


@pytest.fixture(scope="module")
def qmodel() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return quantized(ResidualNet(width=8), torch.randn(2, 3, 16, 16), weight_bits=2, act_bits=2)


def pool_size() -> int:
    return tvm.get_global_func("runtime.NumThreads")()


def test_num_threads_sizes_the_pool_of_each_call(qmodel) -> None:
    x = torch.randn(2, 3, 16, 16)
    mod = fxquant.convert(qmodel, backend="tvm-llvm", cost_model="model", num_threads=1)
    expected = mod(x)
    assert mod.num_threads == 1 and pool_size() == 1
    mod.num_threads = 2
    assert torch.equal(mod(x), expected) and pool_size() == 2
    mod.num_threads = None
    assert mod.num_threads == default_threads()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(fxquant.ConfigError, match=rf"num_threads={bad!r} is invalid"):
            mod.num_threads = bad


def test_another_batch_size_needs_its_own_example_inputs(qmodel) -> None:
    x = torch.randn(5, 3, 16, 16)
    mod = fxquant.convert(qmodel, backend="tvm-llvm", cost_model="model", example_inputs=(torch.zeros(5, 3, 16, 16),))
    assert mod.manifest["inputs"][0]["shape"] == [5, 3, 16, 16]
    assert torch.equal(mod(x).argmax(1), fxquant.convert(qmodel, backend="torch")(x).argmax(1))
    with pytest.raises(fxquant.InputError, match=r"expected shape \(5, 3, 16, 16\) float32, got \(2, 3, 16, 16\).*"
                                                 r"example_inputs=\(torch.zeros\(N, \.\.\.\),\)"):
        mod(x[:2])
