"""One set of CPU kernels for every stage run, so that its artifacts do not depend on the x86-64 machine.

The numerical libraries pick their kernels by the CPU they run on, and kernels
for different instruction sets round differently; a fine-tuned model, a ridge
regressor and everything downstream then depend on the machine. Pinned here
(an environment that sets a variable already wins, at the cost of that
guarantee):

* oneDNN (torch's convolutions) and ATen's own vectorised kernels: AVX2, the
  newest set every machine of this kind has. They read their variables when
  first used.
* MKL (torch's float32 matrix products, compiled into ``libtorch_cpu.so``)
  chooses by vendor: on AMD processors its Zen kernels, whatever
  ``MKL_CBWR`` says; on Intel ones the branch ``MKL_CBWR`` names. The same
  bytes on both vendors need one choice, so :func:`pin_mkl_vendor` answers
  MKL's vendor checks as an AMD Zen processor does, on every x86-64 Linux
  machine whose CPU has AVX2 and FMA (the instructions those kernels use),
  by redirecting the checks' PLT slots (:mod:`stages.core.plt`). MKL asks
  once, at its first matrix product, so importing :mod:`stages` arranges for
  it to happen as soon as torch is imported, and :func:`require_pinned_mkl`
  stops a stage run in a process that imported torch first.
  ``MKL_CBWR=AVX2`` stays pinned off Linux and for a torch whose MKL cannot
  be reached that way (a warning says so).
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

import importlib.abc
import importlib.util
import os
import platform
import sys
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

from stages.core import plt
from stages.core.errors import PipelineError

PINNED_CPU_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                      "OPENBLAS_CORETYPE": "Haswell"}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# MKL's vendor checks and what an AMD Zen processor answers them
MKL_VENDOR_ANSWERS = {"mkl_serv_intel_cpu_true": 0, "mkl_serv_intel_cpu": 0, "mkl_serv_cpuiszen": 1}
ZEN_KERNEL_FLAGS = {"avx2", "fma"}

mkl_vendor: str = "torch not imported yet"  # or "pinned", "torch imported first", "left alone: <why>"


def pin_cpu_kernels() -> None:
    """Set :data:`PINNED_CPU_KERNELS` in the environment (x86-64 only) unless it sets them already, and pin
    MKL's vendor (:func:`pin_mkl_vendor`) now if torch is loaded, else as soon as it is."""
    if not X86_64:
        return
    for name, value in PINNED_CPU_KERNELS.items():
        os.environ.setdefault(name, value)
    if mkl_vendor == "torch not imported yet":
        if "torch" in sys.modules:
            pin_mkl_vendor(torch_came_first=True)
        elif not any(isinstance(finder, _PinMklWhenTorchLoads) for finder in sys.meta_path):
            sys.meta_path.insert(0, _PinMklWhenTorchLoads())


class _PinMklWhenTorchLoads(importlib.abc.MetaPathFinder):
    """Pins MKL's vendor right after the module ``torch`` executes, before anything can compute with it."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            pin_mkl_vendor(torch_came_first=False)

        spec.loader.exec_module = exec_module
        return spec


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's first CPU (``/proc/cpuinfo``)."""
    with open("/proc/cpuinfo") as info:
        return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())


def mkl_library() -> Path:
    """torch's CPU library, MKL compiled in."""
    import torch

    return Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


def pin_mkl_vendor(torch_came_first: bool) -> None:
    """Make MKL in this process answer its vendor checks as on an AMD Zen processor (module docstring); the
    outcome goes to :data:`mkl_vendor`."""
    global mkl_vendor
    import torch

    if not torch.backends.mkl.is_available() or not sys.platform.startswith("linux"):
        mkl_vendor = "left alone: torch has no MKL, or not on Linux (whose ELF loader plt.py knows)"
        return
    if not ZEN_KERNEL_FLAGS <= cpu_flags():
        mkl_vendor = "left alone: the CPU lacks AVX2 or FMA"
        return
    slots = vendor_check_slots()
    if slots.keys() != MKL_VENDOR_ANSWERS.keys():
        library = mkl_library()
        mkl_vendor = f"left alone: {library.name} does not call MKL's vendor checks through its PLT"
        warnings.warn(f"MKL's vendor checks were not found in {library}: torch's matrix products may round "
                      "differently on Intel and AMD processors, and so may the trained models", stacklevel=2)
        return
    for name, slot in slots.items():
        plt.redirect(slot, plt.constant_function(MKL_VENDOR_ANSWERS[name]))
    mkl_vendor = "torch imported first" if torch_came_first else "pinned"


def vendor_check_slots() -> dict[str, int]:
    """The address in this process of each PLT slot through which torch's library calls one of MKL's vendor
    checks (:data:`MKL_VENDOR_ANSWERS`; a check it does not call is absent)."""
    library = mkl_library()
    base = plt.load_address(library)
    return {name: base + offset for name, offset in plt.jump_slot_offsets(library, set(MKL_VENDOR_ANSWERS)).items()}


def mkl_vendor_answers() -> dict[str, int]:
    """What MKL's vendor checks now answer in this process (x86-64 Linux with MKL only)."""
    return {name: plt.call_slot(slot) for name, slot in vendor_check_slots().items()}


def require_pinned_mkl() -> None:
    """Raise if torch was imported before :mod:`stages`: its matrix products may then have run, and MKL chosen
    its kernels, before the pin (a stage that imports torch later is pinned as it does)."""
    if mkl_vendor == "torch imported first":
        raise PipelineError("torch was imported before the package stages, so MKL may have chosen its kernels by "
                            "this CPU's vendor; import stages first")


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
