"""Triton kernels (CUDA). Each module imports triton: import one only on a GPU where Triton is.

- launch.py: what every decode kernel shares at launch (programmatic dependent launch);
- activations.py: an activation row rounded to int8 in groups of 32, for the int4 kernel;
- gemv.py: one row times a weight matrix (bf16, int8, int4), the decode step's products;
- fused.py: the decode step's small operations fused (norms, rotary + cache write, attention,
  SwiGLU's gate);
- prefill.py: several rows (a prompt) times int8 weights; int4 weights dequantised for cuBLAS;
- fp8.py: rows rounded to E4M3 times E4M3 weights (a Triton GEMV, FP8 tensor cores for more).
"""
