"""Read a memory-mapped checkpoint into memory with large sequential reads before the first forward.

Without it the first forward pass faults the weights in as it reaches them: on a
cold page cache that is millions of small reads in the order the matrices are
used. Here each matrix's pages are first announced (``MADV_WILLNEED``: the kernel
starts reading ahead, in large requests) and then mapped in chunk by chunk
(``MADV_POPULATE_READ``, Linux 5.14+) while a progress bar counts the bytes. Where
the OS lacks ``MADV_POPULATE_READ`` the announcement alone is made and the first
forward maps the pages as before.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Iterable

import numpy as np

from ..model.mapped import mapped_pages
from ..progress import bar

#: Linux's MADV_POPULATE_READ (include/uapi/asm-generic/mman-common.h); Python's mmap does not name it
MADV_POPULATE_READ = 22
#: bytes mapped per call: the bar moves every chunk (~0.1 s from a fast disk)
CHUNK = 256 << 20
#: read ahead only while the maps fit in this share of physical memory: more would evict what was
#: read before the forward pass reaches it
MEMORY_SHARE = 0.8


def read_ahead(arrays: Iterable[np.ndarray], progress: bool | None = None) -> int:
    """Fault in the memory-mapped pages of ``arrays`` (others are skipped); the bytes read ahead."""
    ranges, seen = [], set()
    for a in arrays:
        mapped = mapped_pages(a)
        if mapped is not None and (id(mapped[0]), mapped[1]) not in seen:
            seen.add((id(mapped[0]), mapped[1]))
            ranges.append(mapped)
    total = sum(length for _, _, length in ranges)
    if not ranges or total > MEMORY_SHARE * _physical_memory():
        return 0
    willneed = getattr(mmap, "MADV_WILLNEED", None)
    if willneed is not None:
        for base, offset, length in ranges:
            base.madvise(willneed, offset, length)
    if not sys.platform.startswith("linux"):
        return total
    b = bar(total=total >> 20, desc="reading weights", unit="MiB", progress=progress)
    for base, offset, length in ranges:
        for start in range(offset, offset + length, CHUNK):
            n = min(CHUNK, offset + length - start)
            try:
                base.madvise(MADV_POPULATE_READ, start, n)
            except OSError:  # a kernel before 5.14: the forward pass maps the pages itself
                if b is not None:
                    b.close()
                return total
            if b is not None:
                b.update((start + n >> 20) - (start >> 20))
    if b is not None:
        b.close()
    return total


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits
