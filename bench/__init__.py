"""Benchmarks (`make bench`): every figure a ratio measured side by side in one run."""
