"""Weight matrices and the one operation they take part in: y = x @ W.T.

Weights are kept as the checkpoint stores them, shape (out_features,
in_features) like ``torch.nn.Linear``. Several matrices that read the same
input (wq, wk, wv; w1, w3) can share one ``Linear``: their rows are stacked, so
one call computes all outputs side by side and ``split`` separates them.

- A float weight is converted to the compute dtype once (stacked parts are
  concatenated into one matrix).
- A bf16 weight under float32 compute stays bf16 (half the memory, usually a
  memory map; stacked parts are *not* copied) and is widened a tile of rows at
  a time into a reused per-thread buffer, so no weight-sized float32 copy ever
  exists.
- ``Int8Linear`` holds int8 weights with one float scale per output row and
  widens them tile by tile in the same way.

Decoding (a few input rows) is bound by memory bandwidth. A float weight is
one BLAS GEMV, split over the cores by BLAS's own threads. A tiled weight's
tiles are spread over ``parallel.num_threads()`` threads of ours (widening is a
NumPy ufunc, which BLAS cannot thread), each with one BLAS thread.
"""

from __future__ import annotations

import mmap
import threading
from typing import Sequence

import numpy as np

from .parallel import num_threads, run_parallel
from .tensors import bf16_to_float32, is_bf16, to_float

#: floats per widened tile: 256K x 4 bytes = 1 MiB, half of a core's L2 cache (measured on 7B bf16 decode:
#: ~15 % faster than 128K, where Python work per tile weighs more; 512K spills)
TILE_ELEMENTS = 256 * 1024
#: with more than a few input rows, bigger tiles make better GEMMs: 4 MiB
BIG_TILE_ELEMENTS = 1024 * 1024

#: up to this many input rows a tiled multiply is a thin GEMM, bound by memory and by widening:
#: our threads, one BLAS thread each. Above it (prefill) one thread of ours widens big tiles and
#: BLAS's own threads do the (compute-bound) GEMM.
FEW_ROWS = 64

_workspace = threading.local()  # per-thread tile buffers, shared by every Linear


class Linear:
    """Weight matrices W_1..W_n (out_i, in) stacked by rows; calling it computes x @ W.T.

    ``weights``: one (out_features, in_features) array, or a list of them with
    the same in_features. ``dtype``: the compute dtype.
    """

    def __init__(self, weights: np.ndarray | Sequence[np.ndarray], dtype: np.dtype):
        parts = self._describe(weights, dtype)
        self.tiled = all(is_bf16(w) for w in parts) and self.dtype == np.float32
        if self.tiled:
            self.parts = parts
        else:
            floats = [to_float(w, self.dtype) for w in parts]
            self.weight = floats[0] if len(floats) == 1 else np.concatenate(floats)
            self.parts = [self.weight]
            if self.weight is not parts[0]:  # a converted copy replaces them: drop their memory-mapped pages
                for w in parts:
                    release_pages(w)
        self._plans: dict[int, list] = {}

    def _describe(self, weights, dtype) -> list[np.ndarray]:
        parts = [weights] if isinstance(weights, np.ndarray) else list(weights)
        for w in parts:
            if w.ndim != 2 or w.shape[1] != parts[0].shape[1]:
                raise ValueError(f"linear weights must be 2-D with equal in_features, got "
                                 f"{[tuple(p.shape) for p in parts]}")
        self.dtype = np.dtype(dtype)
        self.sizes = [w.shape[0] for w in parts]  # out_features of each stacked matrix
        self.in_features, self.out_features = parts[0].shape[1], sum(self.sizes)
        ends = np.cumsum(self.sizes).tolist()
        self._bounds = list(zip([0] + ends[:-1], ends))
        return parts

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def split(self, y: np.ndarray) -> list[np.ndarray]:
        """The outputs of the stacked matrices, as views: (..., out_features) -> [(..., out_i)]."""
        return [y[..., a:b] for a, b in self._bounds]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (..., in_features) -> (..., out_features)
        if not self.tiled:
            return x @ self.weight.T
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = np.empty((x2.shape[0], self.out_features), dtype=self.dtype)
        self._tiled_matmul(x2, y)
        return y.reshape(*lead, self.out_features)

    def _widen(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Stored rows as compute-dtype rows, written into ``out``."""
        return bf16_to_float32(rows, out=out)

    def _tiled_matmul(self, x2: np.ndarray, y: np.ndarray) -> None:
        elements = TILE_ELEMENTS if x2.shape[0] <= 8 else BIG_TILE_ELEMENTS
        rows = max(1, elements // self.in_features)
        if rows not in self._plans:
            self._plans[rows] = _tile_plan(self.parts, rows)
        tiles = self._plans[rows]

        def work(tiles):
            buf = _buffer(self.in_features, self.dtype, rows)
            for stored, c0, c1 in tiles:
                tile = self._widen(stored, out=buf[: c1 - c0])
                np.matmul(x2, tile.T, out=y[:, c0:c1])

        n = min(num_threads() if x2.shape[0] <= FEW_ROWS else 1, len(tiles))
        run_parallel(work, [tiles[i * len(tiles) // n : (i + 1) * len(tiles) // n] for i in range(n)])


class Int8Linear(Linear):
    """Weight-only int8: W ~ q * scale[:, None], q int8 (out, in), one scale per output row.

    Symmetric, round to nearest, scale = max|row| / 127. The scale is applied
    to the output (y = (x @ q.T) * scale), so widening a tile is a plain
    int8 -> float cast.
    """

    def __init__(self, weights: np.ndarray | Sequence[np.ndarray], dtype: np.dtype):
        parts = self._describe(weights, dtype)
        self.weight = np.empty(self.shape, dtype=np.int8)
        scale = np.empty(self.out_features, dtype=np.float32)
        for (w, r0) in zip(parts, np.cumsum([0] + self.sizes)):
            quantize_int8(w, self.weight[r0 : r0 + w.shape[0]], scale[r0 : r0 + w.shape[0]])
        self.scale = scale.astype(self.dtype)  # (out_features,)
        self.tiled, self.parts = True, [self.weight]
        self._plans: dict[int, list] = {}

    def _widen(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.copyto(out, rows, casting="unsafe")
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = super().__call__(x)
        y *= self.scale
        return y


def quantize_int8(weight: np.ndarray, q: np.ndarray | None = None,
                  scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (q (out, in) int8, scale (out,) float32) with weight ~ q * scale[:, None].

    Works tile by tile, so a bf16 memory map is never widened whole; the pages
    of a memory-mapped weight are released once read. ``q`` and ``scale`` may
    be given to write into.
    """
    out_features, in_features = weight.shape
    q = np.empty((out_features, in_features), dtype=np.int8) if q is None else q
    scale = np.empty(out_features, dtype=np.float32) if scale is None else scale
    step = max(1, TILE_ELEMENTS // in_features)
    for r0 in range(0, out_features, step):
        w = to_float(weight[r0 : r0 + step], np.float32)
        s = np.abs(w).max(axis=1) / 127.0
        s[s == 0] = 1.0  # an all-zero row: any scale gives q = 0
        q[r0 : r0 + step] = np.rint(w / s[:, None])
        scale[r0 : r0 + step] = s
    release_pages(weight)
    return q, scale


def release_pages(a: np.ndarray) -> None:
    """Drop the resident pages of a read-only memory-mapped array from this process (no-op otherwise).

    The data stays in the file (and the OS page cache); touching it again reads
    it back. Used after a memory-mapped weight was converted, so converting a
    checkpoint does not leave all of it counted in the process's memory.
    """
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise") or a.flags.writeable or not a.flags.c_contiguous:
        return  # only read-only maps: a writable (copy-on-write) map may hold changes the file lacks
    start = np.frombuffer(base, dtype=np.uint8).ctypes.data
    begin = a.ctypes.data - start
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the array only
    last = (begin + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)


def _tile_plan(parts: list[np.ndarray], step: int) -> list[tuple[np.ndarray, int, int]]:
    """(stored rows, first and end output column) of every tile of ``step`` rows, in output order.

    The row slices are made once here: a decode step walks thousands of tiles (7B: ~25,000),
    and Python work per tile shows up in the tokens/s.
    """
    tiles, c0 = [], 0
    for w in parts:
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            tiles.append((w[r0:r1], c0 + r0, c0 + r1))
        c0 += w.shape[0]
    return tiles


def _buffer(in_features: int, dtype: np.dtype, rows: int) -> np.ndarray:
    """This thread's reusable tile buffer of ``rows`` x ``in_features``."""
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (in_features, dtype, rows)
    if key not in buffers:
        buffers[key] = np.empty((rows, in_features), dtype=dtype)
    return buffers[key]
