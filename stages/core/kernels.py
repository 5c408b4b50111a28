"""One set of CPU kernels for every stage run, so that its artifacts do not depend on the x86-64 machine.

The numerical libraries pick their kernels by the CPU they run on, and kernels
for different instruction sets round differently; a fine-tuned model, a ridge
regressor and everything downstream then depend on the machine. Pinned here
(an environment that sets a variable already wins, at the cost of that
guarantee):

* oneDNN (torch's convolutions), MKL (torch's matrix products) and ATen's own
  vectorised kernels: AVX2, the newest set every machine of this kind has.
  They read their variables when first used.
* OpenBLAS, numpy's and scipy's (SVM objectives, ridge box regressors, feature
  scaling): its Haswell kernels (AVX2). Unpinned, it picks its AVX-512
  (``SkylakeX``) kernels where the CPU has them, and the box regressors and SVM
  reports of an AMD EPYC with AVX-512 differed from those of one without.
  OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when numpy is first imported:
  importing the package :mod:`stages` pins, before any of its modules imports
  numpy, and :func:`require_pinned_blas` stops a stage run that came too late.
* BLAS threads: OpenBLAS splits some reductions between threads (the ridge
  regressors differed between 1 and 2 threads), so a stage runs numpy's and
  scipy's BLAS on one thread (:func:`one_blas_thread`): its share of a stage's
  time is small. torch's thread count is left alone (one thread would slow
  every conv pass): a machine with another core count than this kind's 2 may
  round differently (README).

Only on x86-64: the variables name x86 instruction sets.
"""
from __future__ import annotations

import os
import platform
from contextlib import AbstractContextManager

from stages.core.errors import PipelineError

PINNED_CPU_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                      "OPENBLAS_CORETYPE": "Haswell"}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels() -> None:
    """Set :data:`PINNED_CPU_KERNELS` in the environment (x86-64 only) unless it sets them already."""
    if X86_64:
        for name, value in PINNED_CPU_KERNELS.items():
            os.environ.setdefault(name, value)


def loaded_openblas_kernels() -> set[str]:
    """The kernel sets of the OpenBLAS libraries this process has loaded (numpy's, scipy's), as threadpoolctl
    reports them."""
    from threadpoolctl import threadpool_info

    return {str(info.get("architecture")) for info in threadpool_info() if info.get("internal_api") == "openblas"}


def require_pinned_blas() -> None:
    """Raise if numpy's or scipy's OpenBLAS was loaded with other kernels than the pinned ones (numpy imported
    before :mod:`stages`); an environment that chose its own ``OPENBLAS_CORETYPE`` is left to its choice."""
    wanted = PINNED_CPU_KERNELS["OPENBLAS_CORETYPE"]
    if not X86_64 or os.environ.get("OPENBLAS_CORETYPE") != wanted:
        return
    loaded = loaded_openblas_kernels() - {wanted}
    if loaded:
        raise PipelineError(f"OpenBLAS was loaded with its {', '.join(sorted(loaded))} kernels, not the pinned "
                            f"{wanted} ones: numpy was imported before the package stages; import stages first "
                            "(or set OPENBLAS_CORETYPE before Python starts)")


def one_blas_thread() -> AbstractContextManager:
    """numpy's and scipy's BLAS on one thread for the block (threadpoolctl): reductions split between threads
    round by the thread count."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
