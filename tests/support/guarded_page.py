"""Memory that ends where an unreadable page begins, to catch a C parser reading too far."""

from __future__ import annotations

import ctypes
import mmap

from lowmemws._native import ffi


class GuardedPage:
    """GuardedPage holds bytes that end exactly where an unreadable page begins."""

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 2 * self.page)
        self.base = ffi.from_buffer(self.map)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        addr = int(ffi.cast("uintptr_t", self.base)) + self.page
        assert libc.mprotect(addr, self.page, 0) == 0  # PROT_NONE

    def place(self, data: bytes) -> object:
        """place copies data to the end of the readable page and returns a pointer to it."""
        start = self.page - len(data)
        self.map[start : self.page] = data
        return self.base + start
