"""Keeping freed memory for reuse (``heap_keep_bytes``): a freed block comes back without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from planes.kernel.errors import SettingsError
from planes.plugins.data.heap import _libc
from planes.plugins.data.limits import DataSettings

# A fresh process each: the allocator's thresholds are process-wide, and the
# dynamic defaults depend on what was freed before.
_PROBE = """
import resource, sys
from planes.plugins.data.heap import keep_freed_memory
took = keep_freed_memory(int(sys.argv[1]))
block = b"x" * (24 << 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = b"x" * (24 << 20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_block_faults(keep_bytes: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(keep_bytes)], capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    return took == "True", int(faults)


@pytest.mark.skipif(_libc() is None, reason="the thresholds are glibc's")
def test_a_freed_block_is_reused_instead_of_faulted_back_in():
    took, faults = _second_block_faults(64 << 20)
    assert took
    assert faults < 64, f"the second 24 MiB block faulted {faults} pages in; the freed one should have been reused"


@pytest.mark.skipif(_libc() is None, reason="the thresholds are glibc's")
def test_zero_leaves_the_allocator_defaults():
    took, faults = _second_block_faults(0)
    assert not took
    # glibc's defaults: the first block was mapped on its own and unmapped when
    # freed, so the second is fresh memory, every page of it faulted in.
    assert faults >= (24 << 20) // 4096 // 2


def test_the_setting_defaults_to_64_mib_and_refuses_negatives():
    assert DataSettings.from_mapping({}).heap_keep_bytes == 64 << 20
    assert DataSettings.from_mapping({"heap_keep_bytes": 0}).heap_keep_bytes == 0
    with pytest.raises(SettingsError, match="heap_keep_bytes"):
        DataSettings.from_mapping({"heap_keep_bytes": -1})
