"""Soft-quantizer passes compiled with TVM for the CPU training step: one pass per feature map, not a dozen.

On CPU a soft quantizer's forward and backward over a feature map are chains of elementwise ops (scale,
clamp, fraction, sigmoid, gathers, products, sums); in PyTorch each op is a pass over memory, and the
chains cost about as much as the convolutions of a small net. TVM, the compiler fxquant deploys with,
builds each chain as one loop for the host CPU, once per process (well under a second). A kernel reads its
inputs once and writes its outputs and per-block partial sums for the parameter gradients.

The PyTorch code stays the reference and the fallback: kernels run only on contiguous float32 CPU tensors
of at least one block (:data:`KERNEL_BLOCK` elements), outside ``torch.compile``, and cover whole blocks
(the caller's PyTorch code finishes the tail). ``FXQUANT_TVM_KERNELS=0`` turns them off. TVM's thread
pool follows ``torch.get_num_threads()``. Forward values that the hard quantizer defines (DSQ, LCQ) are
bit-identical to the PyTorch code; gradients and QN's soft values agree to float32 rounding.
"""

from fxquant.quantizers.compiled import dsq, lcq, qn  # noqa: F401  (registration)
from fxquant.quantizers.compiled.runtime import KERNEL_BLOCK, kernels_enabled

__all__ = ["KERNEL_BLOCK", "kernels_enabled"]
