"""Packed low-bit kernels (Triton on GPU, a CPU path, references). Not built yet: see the mixed-precision issue."""
