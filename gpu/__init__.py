"""Packed low-bit weights and the kernels that run them without a dense copy.

quant.py (the packed format, round-to-nearest quantisation) · reference.py (dequantise + matmul,
the twin every kernel is tested against) · cpu_kernels.py (numba) · cpu_native.py (int4/int8 decode
with integer dot products, C++ built on first use) · cpu_torch.py (torch's weight-only kernels) ·
triton_kernels.py (CUDA) · dispatch.py (picks the kernel for a tensor's device) · modules.py
(QuantLinear, QuantEmbedding) · runtime.py (the thread policy and fused calls a packed model runs with on
the CPU).
"""
