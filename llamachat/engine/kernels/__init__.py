"""The engine's kernels, by the device they run on: `cuda/` (Triton, imported only where a GPU and
Triton are) and `cpu/` (C, built with the system compiler and called through ctypes). Nothing
here knows the model: the quantised layers (quantize.py) and the decode steps (decode/) call in.
"""
