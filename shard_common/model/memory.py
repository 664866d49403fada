"""Giving back what loading a model took beyond the layers it built.

Building layers reads every page of a memory-mapped GGUF and allocates float temporaries (a
dequantized embedding alone is hundreds of MB). Afterwards the layers hold their own copies,
yet the process would still count the file's pages (the embedding, kept in stored form for
lookups, keeps the mapping alive) and glibc would keep the freed heap. A loaded model's resident
memory should be its layers, which is what operators size machines by.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Iterable

import numpy as np

from .qtensor import QTensor


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def release_after_build(tensors: Iterable[QTensor]) -> None:
    """Drop the pages of the files ``tensors`` map and return freed heap to the system.

    Dropping mapped pages is always safe: a page read again (an embedding row looked up) comes
    back from the page cache, so memory then holds the layers plus the rows in use."""
    maps = {}
    for t in tensors:
        base = t.data
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, mmap.mmap):
            maps[id(base)] = base
    for m in maps.values():
        if not m.closed and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)
    if _LIBC is not None:  # glibc only; elsewhere the heap stays as the allocator keeps it
        _LIBC.malloc_trim(0)
