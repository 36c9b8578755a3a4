"""C kernels for int4 on x86 CPUs with AVX2 (cpu_kernels.c) and their loader (native.py): the
products of an int4 layer and a whole decode step, built on first use and called through ctypes.
"""
