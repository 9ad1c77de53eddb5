"""Packed low-bit weights and the kernels that run them without a dense copy.

quant.py (the packed format, round-to-nearest quantisation) · reference.py (dequantise + matmul,
the twin every kernel is tested against) · cpu_kernels.py (numba) · triton_kernels.py (CUDA) ·
dispatch.py (picks the kernel for a tensor's device) · modules.py (QuantLinear, QuantEmbedding) ·
runtime.py (the thread policy and fused calls a packed model runs with on the CPU).
"""
