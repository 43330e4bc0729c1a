"""The TVM training kernels against the PyTorch code they replace (``FXQUANT_TVM_KERNELS=0``).

Forward values the hard quantizer defines (DSQ, LCQ) must be bit-identical; gradients and QN's soft values
agree to float32 rounding. Shapes include a tail shorter than a kernel block, which PyTorch finishes.
"""

from __future__ import annotations

import pytest
import torch

from fxquant.quantizers.compiled import KERNEL_BLOCK, kernels_enabled, runtime
from fxquant.quantizers.compiled import qn as qn_kernels
from fxquant.quantizers.dsq import _DSQStraightThrough
from fxquant.quantizers.lcq import compander, lcq_quantize
from fxquant.quantizers.qn import qn_soft

FEATURE_MAP = (32, 16, 28, 28)  # whole blocks only
WITH_TAIL = (3 * KERNEL_BLOCK + 17,)


def _both_paths(monkeypatch, run, forward: str, backward: str):
    """``run()`` with the kernels on, then off; asserts that the named kernels ran in the first call only.

    Returns both results and the kernels the first call ran."""
    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "1")
    before = runtime.CALLS.copy()
    fused = run()
    ran = runtime.CALLS - before
    assert [name for name in ran if name.startswith(forward)] and [name for name in ran if name.startswith(backward)]
    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "0")
    before = runtime.CALLS.copy()
    reference = run()
    assert runtime.CALLS == before
    return fused, reference, ran


def _assert_close(fused, reference, rtol=2e-5):
    for a, b in zip(fused, reference, strict=True):
        scale = b.abs().max().clamp_min(1e-6)
        assert float((a - b).abs().max() / scale) < rtol


@pytest.mark.parametrize("shape", [FEATURE_MAP, WITH_TAIL])
@pytest.mark.parametrize("low_is_zero", [True, False])
def test_dsq_kernels_match_pytorch(monkeypatch, shape, low_is_zero):
    def run():
        torch.manual_seed(0)
        x = (torch.randn(shape) * 2).requires_grad_()
        low = torch.tensor(0.0 if low_is_zero else -0.7, requires_grad=True)
        step = torch.tensor(0.3, requires_grad=True)
        alpha = torch.tensor(0.2, requires_grad=True)
        out = _DSQStraightThrough.apply(x, low, step, alpha, 3, low_is_zero)
        out.backward(torch.randn(shape))
        return out.detach(), x.grad, low.grad, step.grad, alpha.grad

    fused, reference, _ = _both_paths(monkeypatch, run, "dsq_forward", "dsq_backward")
    assert torch.equal(fused[0], reference[0])  # the hard forward, bit for bit
    # Σ over ~400k float32 terms on either side: α's gradient (a difference of two sums) is the loosest
    _assert_close(fused[1:], reference[1:], rtol=5e-3)
    _assert_close(fused[1:3], reference[1:3])


@pytest.mark.parametrize("shape", [FEATURE_MAP, WITH_TAIL])
@pytest.mark.parametrize(("bits", "temperature", "spread"), [
    (4, 10.0, 2.0), (8, 3.0, 2.0), (2, 20.0, 2.0),
    (4, 100.0, 2.0),  # T·gap beyond the running product's range: one exp per threshold
    (4, 10.0, 300.0),  # inputs far outside the thresholds: saturated exponentials
])
def test_qn_kernels_match_pytorch(monkeypatch, shape, bits, temperature, spread):
    n = 2**bits - 1
    geometric = temperature <= qn_kernels.GEOMETRIC_MAX_STEP

    def run():
        torch.manual_seed(0)
        x = (torch.randn(shape) * spread).requires_grad_()
        alpha = torch.tensor(0.3, requires_grad=True)
        beta = torch.tensor(1 / 0.3, requires_grad=True)
        targets, biases = torch.arange(n + 1.0), torch.arange(n) + 0.5
        out = qn_soft(x, alpha, beta, biases, temperature, targets, evenly_spaced=True)
        out.backward(torch.randn(shape))
        return out.detach(), x.grad, alpha.grad, beta.grad

    forward = "qn_even_forward_geometric" if geometric else "qn_even_forward"
    fused, reference, ran = _both_paths(monkeypatch, run, forward, "qn_even_backward")
    assert ("qn_even_forward_geometric" in ran) == geometric
    # at T = 100 a sigmoid's slope is 25 per unit: float32 rounding of its argument moves α's and β's sums by
    # ~2e-5 relative on either path (both measured against float64)
    _assert_close(fused, reference, rtol=1e-4)


@pytest.mark.parametrize(("shape", "s", "symmetric"), [
    (FEATURE_MAP, 15, False), (FEATURE_MAP, 7, True), (WITH_TAIL, 3, False), ((5 * KERNEL_BLOCK,), 31, True),
])
def test_lcq_kernels_match_pytorch(monkeypatch, shape, s, symmetric):
    def run():
        torch.manual_seed(0)
        x = (torch.randn(shape) * 2).requires_grad_()
        theta = (torch.randn(16) * 0.5).requires_grad_()
        alpha = torch.tensor(2.5, requires_grad=True)
        gamma, beta = compander(theta)
        out = lcq_quantize(x, alpha, gamma, beta, s, symmetric)
        out.backward(torch.randn(shape))
        return out.detach(), x.grad, alpha.grad, theta.grad

    fused, reference, _ = _both_paths(monkeypatch, run, "lcq_forward", "lcq_backward")
    assert torch.equal(fused[0], reference[0])
    assert torch.equal(fused[1], reference[1])  # grad_x = g·1{inside}: exact
    _assert_close(fused[2:], reference[2:])


def test_kernels_only_where_they_apply(monkeypatch):
    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "1")
    x = torch.randn(FEATURE_MAP)
    assert kernels_enabled("dsq_backward", x)
    assert not kernels_enabled("dsq_backward", x.double())  # float64 (gradcheck) stays on PyTorch
    assert not kernels_enabled("dsq_backward", x.transpose(1, 2))  # not contiguous
    assert not kernels_enabled("dsq_backward", torch.randn(KERNEL_BLOCK - 1))  # less than a block
    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "0")
    assert not kernels_enabled("dsq_backward", x)


def test_kernel_that_cannot_build_falls_back_with_a_warning(monkeypatch):
    def broken():
        raise RuntimeError("no LLVM for this host")

    monkeypatch.setitem(runtime._BUILDERS, "broken_for_test", broken)
    runtime._compiled.cache_clear()
    with pytest.warns(UserWarning, match="broken_for_test.*no LLVM for this host"):
        assert not kernels_enabled("broken_for_test", torch.randn(FEATURE_MAP))
    runtime._compiled.cache_clear()


def test_vector_exp_is_accurate():
    """The kernels' polynomial exp against torch.exp over the range a sigmoid of a clamped input sees."""
    import tvm
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from fxquant.backends.tvm.build import host_target_dict

    v = runtime.VectorOps()
    blocks = tirx.Var("blocks", "int64")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("vexp")
            x = T.arg("x", T.buffer((blocks, runtime.ROWS, runtime.LANES), "float32"))
            y = T.arg("y", T.buffer((blocks, runtime.ROWS, runtime.LANES), "float32"))
            with T.serial(0, blocks) as b:
                with T.serial(0, runtime.ROWS) as j:
                    T.buffer_store(y, v.exp(x[b, j, v.ramp]), [b, j, v.ramp])
    fn = tvm.compile(tvm.IRModule({"vexp": ib.get()}), target=host_target_dict())["vexp"]
    x = torch.linspace(-87.0, 87.0, 4 * KERNEL_BLOCK)
    y = torch.empty_like(x)
    fn(runtime.as_blocks(x, 4), runtime.as_blocks(y, 4))
    relative = ((y.double() - x.double().exp()) / x.double().exp()).abs()
    assert float(relative.max()) < 4e-7


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="CPU affinity is a Linux API")
def test_thread_pool_follows_torch_and_keeps_the_affinity(monkeypatch):
    """TVM's default pool modes pin the calling thread to one core; the kernels must not."""
    import os

    import tvm

    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "1")
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    x = torch.randn(FEATURE_MAP, requires_grad=True)
    step = torch.tensor(0.3)
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            _DSQStraightThrough.apply(x, torch.tensor(0.0), step, torch.tensor(0.2), 3, True).sum().backward()
            assert os.sched_getaffinity(0) == affinity
            assert tvm.get_global_func("runtime.NumThreads")() == n
    finally:
        torch.set_num_threads(threads)
