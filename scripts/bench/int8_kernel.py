#!/usr/bin/env python
"""What caps int8 decode: the rate one core widens and multiplies int8 weights, against the memory bound.

    python scripts/bench/int8_kernel.py

``Int8Linear`` widens each tile with NumPy's int8 -> float32 cast into an L2/L3-resident
buffer and multiplies it by x with ``np.dot`` (the row scales apply to the output). This
times the cast alone, the GEMV alone and both, on a 7B w1-sized int8 matrix (45 MB, in
memory), one thread, CPU time, at ``Int8Linear``'s decode tile and a smaller one; then the
read bandwidth on all threads in the same run. Two cores at the kernel's rate read
2 x rate bytes of int8 a second, so int8 decode can reach at most that share of the bound
(bytes per token / bandwidth), whatever else is done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import read_bandwidth  # noqa: E402

from llama2np.model.linear import INT8_TILE_ELEMENTS  # noqa: E402
from llama2np.model.threads import blas_threads, num_threads  # noqa: E402

ROWS, COLS = 11008, 4096  # Llama 2 7B's w1


def rate(q: np.ndarray, x: np.ndarray, tile: int, what: str, repeats: int = 7) -> float:
    """G weights/s per core (median of ``repeats``) of ``what``: "cast", "gemv" or "both"."""
    rows = max(1, tile // q.shape[1])
    buf, y = np.empty((rows, q.shape[1]), np.float32), np.empty(q.shape[0], np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for r0 in range(0, q.shape[0], rows):
            t = q[r0:r0 + rows]
            b = buf[:len(t)]
            if what != "gemv":
                np.copyto(b, t, casting="unsafe")
            if what != "cast":
                np.dot(b, x, out=y[r0:r0 + len(t)])
        times.append(time.thread_time() - t0)
    return q.size / float(np.median(times)) / 1e9


def main() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (ROWS, COLS), dtype=np.int8)
    x = rng.standard_normal(COLS, dtype=np.float32)
    kernel = {}
    with blas_threads(1):
        for tile in (256 * 1024, INT8_TILE_ELEMENTS):
            r = {w: rate(q, x, tile, w) for w in ("cast", "gemv", "both")}
            kernel[tile] = r["both"]
            print(f"tile {tile // 1024}K values, one core: cast {r['cast']:.2f}, GEMV of the widened tile "
                  f"{r['gemv']:.2f}, both (the int8 kernel) {r['both']:.2f} G weights/s")
    threads = num_threads()
    bandwidth = read_bandwidth(threads, 1 << 30)
    best = kernel[INT8_TILE_ELEMENTS] * threads * 1e9  # bytes of int8 a second on all cores
    print(f"read bandwidth, {threads} threads: {bandwidth / 1e9:.1f} GB/s; {threads} cores at the kernel's rate "
          f"read {best / 1e9:.1f} GB/s of int8: int8 decode reaches at most {best / bandwidth:.0%} of its bound")


if __name__ == "__main__":
    main()
