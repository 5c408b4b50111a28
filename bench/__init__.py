"""Benchmarks (`make bench`): every figure a ratio measured side by side in one run.

Importing the package stages first pins the CPU kernels as in a stage run (stages.core.kernels), before any
benchmark imports numpy or torch.
"""
import stages  # noqa: F401
