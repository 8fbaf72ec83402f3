"""Pages of memory-mapped weights: which pages an array covers, and dropping them after a conversion."""

from __future__ import annotations

import mmap

import numpy as np


def release_pages(a: np.ndarray) -> None:
    """Drop the resident pages of a read-only memory-mapped array from this process (no-op otherwise).

    The data stays in the file (and the OS page cache); touching it again reads
    it back. Used after a memory-mapped weight was converted, so converting a
    checkpoint does not leave all of it counted in the process's memory.
    """
    mapped = mapped_pages(a, inside=True)  # whole pages inside the array only
    if mapped is not None:
        base, first, length = mapped
        base.madvise(mmap.MADV_DONTNEED, first, length)


def mapped_pages(a: np.ndarray, inside: bool = False) -> tuple[mmap.mmap, int, int] | None:
    """(the read-only memory map holding ``a``, offset, length) of the pages ``a`` covers (``inside``:
    only the pages wholly inside it), or None when ``a`` is not a contiguous view of such a map."""
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise") or a.flags.writeable or not a.flags.c_contiguous:
        return None  # only read-only maps: a writable (copy-on-write) map may hold changes the file lacks
    start = np.frombuffer(base, dtype=np.uint8).ctypes.data
    begin = a.ctypes.data - start
    page = mmap.PAGESIZE
    first = -(-begin // page) * page if inside else begin // page * page
    last = (begin + a.nbytes) // page * page if inside else min(-(-(begin + a.nbytes) // page) * page, len(base))
    return (base, first, last - first) if last > first else None
