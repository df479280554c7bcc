"""glibc malloc keeps a freed activation-sized buffer in the heap once the engine's settings apply."""

import ctypes
import platform

import pytest
import torch

from runtime.cpu_malloc import MMAP_THRESHOLD, keep_freed_memory

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(not glibc, reason="glibc's mallopt only")
def test_a_freed_activation_stays_in_the_heap():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    size = MMAP_THRESHOLD // 2  # past glibc's default threshold (128 KiB, adapting up to 32 MiB)
    before = libc.mallinfo2()
    t = torch.empty(size, dtype=torch.uint8)
    during = libc.mallinfo2()
    assert during.hblkhd - before.hblkhd < size  # from the heap, not its own mmap
    del t
    after = libc.mallinfo2()
    assert after.arena >= during.arena and after.fordblks - during.fordblks >= size // 2  # free, not trimmed back
