"""Threads: a small pool for our own tile work, and the BLAS library's thread count.

Two kinds of threads share the cores. BLAS's own threads split a float
matrix product, GEMV (decoding) or GEMM (prefill), which is all a float
model's forward pass needs. Weights stored narrower (bf16, int8) are widened
tile by tile with NumPy ufuncs, which BLAS cannot thread: ``run_parallel``
spreads those tiles over our own threads (NumPy releases the GIL inside
ufuncs and matmul), each asking for one BLAS thread (``blas_threads(1)``).

The two must not run at once: measured on a 2-core VM, OpenBLAS's threads
keep spinning for ~0.1 s after their last call, and our threads running then
get half the memory bandwidth. So a forward pass picks one kind for all its
thin multiplies (see ``Transformer.forward``).

BLAS control needs no extra dependency: it calls OpenBLAS's
``*_set_num_threads`` through ctypes when NumPy's BLAS is OpenBLAS, and is a
no-op otherwise.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np  # noqa: F401  (NumPy must be loaded so its BLAS shows up in the process maps)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_num_threads = _cpu_count()
_pool: ThreadPoolExecutor | None = None


def num_threads() -> int:
    """Threads llama2np uses for its own work (default: the CPUs this process may run on)."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for tile work and for BLAS during prefill."""
    global _num_threads, _pool
    if n < 1:
        raise ValueError(f"need at least one thread, got {n}")
    _num_threads = n
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    _blas_set(n)


def run_parallel(work: Callable[[Sequence], None], chunks: Sequence[Sequence]) -> None:
    """Call ``work(chunk)`` for every chunk, one per thread; the caller's thread takes the last."""
    global _pool
    if len(chunks) == 1:
        work(chunks[0])
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, _num_threads - 1), thread_name_prefix="llama2np")
    futures = [_pool.submit(work, c) for c in chunks[:-1]]
    work(chunks[-1])
    for f in futures:
        f.result()


# --- BLAS threads -----------------------------------------------------------------------

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")


def _find_openblas_setter() -> Callable[[int], None] | None:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:  # not Linux: leave BLAS alone
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                return setter
    return None


_setter = _find_openblas_setter()
_blas_current = None


def _blas_set(n: int) -> None:
    global _blas_current
    if _setter is not None and n != _blas_current:
        _setter(n)
        _blas_current = n


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` BLAS threads (None: ``num_threads()``), then go back to ``num_threads()``."""
    _blas_set(n or _num_threads)
    try:
        yield
    finally:
        _blas_set(_num_threads)
