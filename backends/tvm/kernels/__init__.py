"""Bit-serial popcount kernels (x86 AVX2, AArch64 NEON, portable LLVM) for frozen integer conv/dense layers."""

from .bitserial import bitserial_supported, conv2d_primfunc, dense_primfunc, pack_weights

__all__ = ["bitserial_supported", "pack_weights", "conv2d_primfunc", "dense_primfunc"]
