"""Redirecting a library's PLT calls (stages/core/plt.py), on the running process."""
from __future__ import annotations

import ctypes
import platform

import pytest

from stages.core import plt
from stages.core.kernels import mkl_library

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="x86-64 machine code and ELF layout")


@pytest.mark.parametrize("value", [0, 1, -7, 2**31 - 1])
def test_a_constant_function_returns_its_value(value):
    slot = ctypes.c_void_p(plt.constant_function(value))
    assert plt.call_slot(ctypes.addressof(slot)) == value


def test_redirect_replaces_what_a_slot_calls():
    slot = ctypes.c_void_p(plt.constant_function(3))
    plt.redirect(ctypes.addressof(slot), plt.constant_function(4))
    assert plt.call_slot(ctypes.addressof(slot)) == 4


def test_jump_slots_are_found_by_name_and_only_for_functions_called_through_the_plt():
    library = mkl_library()
    slots = plt.jump_slot_offsets(library, {"mkl_serv_intel_cpu_true", "no_such_function"})
    assert list(slots) == ["mkl_serv_intel_cpu_true"]
    assert plt.load_address(library) % 4096 == 0


def test_a_library_not_loaded_has_no_load_address(tmp_path):
    with pytest.raises(LookupError, match="not loaded"):
        plt.load_address(tmp_path / "libnothing.so")
