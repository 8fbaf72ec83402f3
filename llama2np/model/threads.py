"""Threads: a small pool for our own tile work, and the BLAS library's thread count.

The forward pass splits its weight multiplies over threads of ours:
``run_parallel`` hands each thread the same queue of tiles (bf16/int8 tiles
widened with NumPy ufuncs, which BLAS cannot thread; big float matrices in
blocks of rows), and each multiplies with ``np.dot`` on one BLAS thread
(``blas_threads(1)``). NumPy releases the GIL inside ufuncs and ``np.dot``.

BLAS's own threads are kept out of the forward pass: measured on a 2-core VM,
OpenBLAS's threads keep spinning for ~0.1 s after their last call, and on a
machine shared with other jobs their hand-offs collapsed (15M decode: 53
tok/s median with two OpenBLAS threads, 139 with ours).

BLAS's thread count is set through ``threadpoolctl``, which finds the BLAS
library NumPy loaded (OpenBLAS, MKL or BLIS, on any OS). Setting it is cached:
a forward pass that keeps the count asks nothing of the library.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np  # noqa: F401  (NumPy must be loaded so threadpoolctl finds its BLAS)


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

_blas = None  # threadpoolctl's controller of the BLAS libraries loaded in this process
_blas_current = None


def _blas_set(n: int) -> None:
    """Ask every loaded BLAS library (OpenBLAS, MKL, BLIS: whichever NumPy uses) for ``n`` threads."""
    global _blas, _blas_current
    if n == _blas_current:
        return
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    _blas.limit(limits=n)
    _blas_current = n


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` BLAS threads (None: ``num_threads()``), then go back to ``num_threads()``."""
    _blas_set(n or _num_threads)
    try:
        yield
    finally:
        _blas_set(_num_threads)
