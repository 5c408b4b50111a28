"""The C allocator setting (stages.core.memory): a freed large buffer is reused, not faulted in again."""
from __future__ import annotations

import resource

import pytest
import torch

from stages.core.memory import keep_freed_memory

MIB_64 = 2**26


def test_a_freed_64_mib_buffer_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    torch.empty(MIB_64 // 4).fill_(1.0)  # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(MIB_64 // 4).fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000  # a fresh mapping faults in 16,384 pages of 4 KiB
