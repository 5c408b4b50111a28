"""The CPU kernels every stage run is pinned to (stages/core/kernels.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from stages.core import kernels
from stages.core.kernels import PINNED_CPU_KERNELS, X86_64, loaded_openblas_kernels, pin_cpu_kernels

x86_only = pytest.mark.skipif(not X86_64, reason="the pins name x86 instruction sets")


@x86_only
def test_the_test_process_runs_pinned():
    assert all(os.environ.get(name) == value for name, value in PINNED_CPU_KERNELS.items())
    assert loaded_openblas_kernels() == {"Haswell"}  # numpy's and scipy's OpenBLAS, loaded after the pin


@x86_only
def test_pins_are_set_unless_the_environment_sets_them(monkeypatch):
    for name in PINNED_CPU_KERNELS:
        monkeypatch.delenv(name)  # set for the session (conftest): restored after the test
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    pin_cpu_kernels()
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell" and os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_nothing_is_pinned_off_x86(monkeypatch):
    for name in PINNED_CPU_KERNELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernels, "X86_64", False)
    pin_cpu_kernels()
    assert not any(name in os.environ for name in PINNED_CPU_KERNELS)


def python(code: str, coretype: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@x86_only
def test_numpy_loaded_before_the_pin_stops_a_stage_run():
    # numpy loads OpenBLAS's Sandy Bridge kernels (any x86-64 CPU runs them), then the pin comes too late
    late = python("import os, numpy\n"
                  "os.environ['OPENBLAS_CORETYPE'] = 'Haswell'\n"
                  "from stages.core.kernels import require_pinned_blas\n"
                  "require_pinned_blas()", "Sandybridge")
    assert late.returncode != 0 and "Sandybridge kernels, not the pinned Haswell ones" in late.stderr
    pinned = python("import stages, numpy\n"
                    "from stages.core.kernels import loaded_openblas_kernels, require_pinned_blas\n"
                    "require_pinned_blas()\n"
                    "print(sorted(loaded_openblas_kernels()))", "Haswell")
    assert pinned.returncode == 0 and pinned.stdout.strip() == "['Haswell']", pinned.stderr


@x86_only
def test_an_environment_that_chose_its_own_coretype_is_left_to_it():
    chosen = python("import stages, numpy\n"
                    "from stages.core.kernels import require_pinned_blas\n"
                    "require_pinned_blas()", "Sandybridge")
    assert chosen.returncode == 0, chosen.stderr
