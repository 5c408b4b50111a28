"""The stages of the R-CNN family (one module each, ``run(...)`` their entry) and what they share.

Importing the package pins the CPU kernels (:mod:`stages.core.kernels`) before any of its modules loads numpy,
whose OpenBLAS reads its pin only then, and lets the C allocator keep freed memory (:mod:`stages.core.memory`).
"""
from stages.core.kernels import pin_cpu_kernels
from stages.core.memory import keep_freed_memory

pin_cpu_kernels()
keep_freed_memory()
