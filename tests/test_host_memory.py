"""Freed host memory goes back to the OS when the engine goes idle (slserve/memory/host_malloc.py).

The mechanism behind resident memory that ratchets up across bursts of traffic although nothing
stays live: once glibc has freed a large block it serves blocks up to that size from its heap,
and the freed heap stays resident. Shown in a fresh process, so no other allocation interferes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from slserve.memory.host_malloc import release_free_memory

_SCRIPT = """
import ctypes, gc
from slserve.memory.host_malloc import release_free_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

big = bytearray(8 << 20)  # mmap'd; freeing it raises glibc's mmap threshold to 8 MiB
del big
blocks = [bytearray(256 << 10) for _ in range(1600)]  # 400 MiB, now from the heap
keep = blocks[-1]  # pins the heap's top: only a trim inside the heap can give the rest back
del blocks
gc.collect()
before = rss_mib()
assert release_free_memory()
print(before, rss_mib())
"""


@pytest.mark.skipif(not release_free_memory(), reason="needs glibc's malloc_trim")
def test_freed_heap_is_returned_to_the_os():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before - after > 300, (before, after)
