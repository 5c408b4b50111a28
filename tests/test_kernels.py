"""The CPU kernels every stage run is pinned to (stages/core/kernels.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from stages.core import kernels
from stages.core.kernels import (MKL_VENDOR_ANSWERS, PINNED_CPU_KERNELS, X86_64, ZEN_KERNEL_FLAGS, cpu_flags,
                                  loaded_openblas_kernels, mkl_vendor_answers, pin_cpu_kernels)

x86_only = pytest.mark.skipif(not X86_64, reason="the pins name x86 instruction sets")
zen_kernels = pytest.mark.skipif(not X86_64 or not ZEN_KERNEL_FLAGS <= cpu_flags(),
                                 reason="MKL's vendor is pinned on x86-64 CPUs with AVX2 and FMA")
# A float32 product through MKL's Zen kernels, as an AMD EPYC computes it (and, emulated, an Intel Xeon whose
# vendor checks an LD_PRELOAD library answered as AMD's: that emulation reproduced an AMD EPYC's trained models
# to the byte). MKL's Intel kernels round it differently (AVX2 branch 3704899e..., COMPATIBLE 1b6e0ced...).
ZEN_PRODUCT_MD5 = "a84ff28e6171c1d1279cd417fadf6c45"
PRODUCT = ("import hashlib, numpy, torch\n"
           "a = torch.from_numpy((numpy.arange(64 * 512) % 1009 / 1009).astype(numpy.float32).reshape(64, 512))\n"
           "b = torch.from_numpy((numpy.arange(512 * 256) % 997 / 997 - 0.5).astype(numpy.float32).reshape(512, 256))\n"
           "print(hashlib.md5((a @ b).numpy().tobytes()).hexdigest())")


@x86_only
def test_the_test_process_runs_pinned():
    assert all(os.environ.get(name) == value for name, value in PINNED_CPU_KERNELS.items())
    assert loaded_openblas_kernels() == {"Haswell"}  # numpy's and scipy's OpenBLAS, loaded after the pin


@zen_kernels
def test_mkl_answers_its_vendor_checks_as_an_amd_zen_processor():
    import torch  # noqa: F401  (pins, unless a test before imported it: conftest imported stages first)

    assert kernels.mkl_vendor == "pinned"
    assert mkl_vendor_answers() == MKL_VENDOR_ANSWERS


@zen_kernels
def test_matrix_products_round_as_on_an_amd_processor():
    product = python("import stages\n" + PRODUCT, "Haswell")
    assert product.stdout.strip() == ZEN_PRODUCT_MD5, product.stderr


@zen_kernels
def test_a_stage_run_stops_when_torch_came_before_stages():
    late = python("import torch\n"
                  "torch.ones(2, 2) @ torch.ones(2, 2)\n"
                  "import stages\n"
                  "from stages.core.kernels import require_pinned_mkl\n"
                  "require_pinned_mkl()", "Haswell")
    assert late.returncode != 0 and "torch was imported before the package stages" in late.stderr


def test_mkl_is_left_alone_on_a_cpu_without_the_zen_kernels_instructions(monkeypatch):
    monkeypatch.setattr(kernels, "mkl_vendor", kernels.mkl_vendor)  # restored after the test
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(kernels, "plt", None)  # any attempt to redirect would fail
    kernels.pin_mkl_vendor(torch_came_first=False)
    assert kernels.mkl_vendor == "left alone: the CPU lacks AVX2 or FMA"


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
