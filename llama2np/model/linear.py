"""Weight matrices and the one operation they take part in: y = x @ W.T.

Weights are kept as the checkpoint stores them, shape (out_features,
in_features) like ``torch.nn.Linear``. Several matrices that read the same
input (wq, wk, wv; w1, w3) can share one ``Linear``: their rows are stacked, so
one call computes all outputs side by side and ``split`` separates them.

- A float weight is converted to the compute dtype once (stacked parts are
  concatenated into one matrix).
- A bf16 or fp16 weight stays as stored (half the memory, usually a memory
  map; stacked parts are *not* copied) and is widened a tile of rows at a time
  into a reused per-thread buffer, so no weight-sized float32 (or float64) copy
  ever exists (Meta ships Llama 2 in bf16, the HF hub in fp16).
- ``Int8Linear`` holds int8 weights with one float scale per output row and
  widens them tile by tile in the same way.

Products run on ``parallel.num_threads()`` threads of ours, each with one
BLAS thread, for any number of input rows: threads take the next tile as they
finish one, widen it (NumPy ufuncs, which BLAS cannot thread) and hand it to
``np.dot``. Float weights are split the same way in blocks of rows (nothing to
widen); only small ones (< SPLIT_ELEMENTS) run on the calling thread, and one
input row multiplies float rows by ``row_dots``. ``np.dot`` and ufuncs release
the GIL, so the 2-D products here use ``np.dot`` (two threads of 2-D ``np.matmul``
GEMVs ran no faster than one; the batched matmul of ``quant_blocks`` does scale).
BLAS's own threads are not used: on a machine shared with
other jobs their spinning collapsed (15M decode: 53 tok/s median with two
OpenBLAS threads, 139 with ours).

Long prompts (``WHOLE_ROWS`` input rows and more) are the exception: there one
sgemm over the whole matrix beats many tile-sized GEMMs, so our threads widen
the whole matrix into one shared float32 buffer and BLAS's threads multiply.

bf16 is widened without a casting loop. Two adjacent bf16 values are one
uint32 ``p`` (little-endian: the even column in the low half); ``p << 16`` is
the even column's float32 and ``p & 0xFFFF0000`` the odd one's, both
uint32 -> uint32 ufuncs. So y = W[:, 0::2] @ x[0::2] + W[:, 1::2] @ x[1::2],
one tile-sized buffer reused for both halves (measured one thread on a
Zen-class core: 6.1 G weights/s against 3.4 for ``np.left_shift`` uint16 ->
uint32).
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .mapped import release_pages
from .storage import bf16_pair_even, bf16_pair_odd, check_finite_fp16, fp16_pair_even, fp16_pair_odd, is_bf16, to_float
from .threads import blas_threads, num_threads, run_parallel

#: widened values per tile when few rows come in (decoding): 256K floats = 1 MiB, a Zen core's L2.
#: Smaller tiles widen a little faster on one thread, but two threads then hand the GIL back and
#: forth twice as often (7B decode, 3 rounds: 128K 1.08-1.49, 256K 1.35-1.54, 1024K 1.35-1.51 tok/s)
TILE_ELEMENTS = 256 * 1024
_decode_tile: int | None = None  # the decode tile measured for this CPU (``tuning``); None: TILE_ELEMENTS


def decode_tile() -> int | None:
    """Values per decode tile set by ``set_decode_tile`` (None: the default, TILE_ELEMENTS)."""
    return _decode_tile


def set_decode_tile(elements: int | None) -> None:
    """Use ``elements`` widened values per bf16/fp16 tile when few rows come in (None: TILE_ELEMENTS)."""
    global _decode_tile
    if elements is not None and elements < 1:
        raise ValueError(f"a tile needs at least one value, got {elements}")
    _decode_tile = elements


#: int8 decode tiles: NumPy's int8 -> float cast costs microseconds per call to set up, so int8
#: wants bigger tiles than bf16's plain ufuncs (one thread, CPU time, 7B shapes: 256K 5.3-5.7,
#: 512K 7.6-7.8, 1024K 8.4-8.6 G weights/s; 4 MiB buffers still fit the L3)
INT8_TILE_ELEMENTS = 1024 * 1024
#: widened values per tile with more input rows (prefill): each tile's GEMM is long enough to
#: amortise widening it (measured at 128 input rows: 95-110 % of the 2-thread sgemm rate)
BIG_TILE_ELEMENTS = 512 * 1024
#: float weights (nothing to widen) from this many values up are split over our threads in blocks
#: of this many: measured at 15M / 110M decode, smaller matrices gain less than a hand-off costs
SPLIT_ELEMENTS = 1024 * 1024
#: input rows up to which a widened tile is multiplied by each row separately (GEMVs): OpenBLAS's
#: GEMM is slow for a few columns (one thread, 128 x 2048 tile: 2 rows 6.1 G weights/s as a GEMM,
#: 12.4 as two GEMVs; 4 rows 5.0 / 6.4; 8 rows 4.9 / 3.2)
GEMV_ROWS = 4
#: input rows up to which tiles are TILE_ELEMENTS big
FEW_ROWS = 8
#: input rows from which a float32 product widens the whole matrix once (both threads) into one
#: shared buffer and runs one sgemm on BLAS's threads: tiles of 512K values make GEMMs too small
#: for sgemm's best rate (one 7B w1+w3, 2 threads, GFLOP/s tiles / whole: 128 rows 184 / 161,
#: 256 rows 190 / 197, 384 rows 208 / 213, 512 rows 178-188 / 217-219, 1024 rows 161 / 231;
#: sgemm on a float32 copy 206-250). The buffer holds the largest matrix (7B: the output, 0.5 GiB).
WHOLE_ROWS = 384

#: compute dtypes a bf16 weight is widened to tile by tile
TILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_workspace = threading.local()  # per-thread tile buffers, shared by every Linear


class Linear:
    """Weight matrices W_1..W_n (out_i, in) stacked by rows; calling it computes x @ W.T.

    ``weights``: one (out_features, in_features) array, or a list of them with
    the same in_features. ``dtype``: the compute dtype.
    """

    def __init__(self, weights: np.ndarray | Sequence[np.ndarray], dtype: np.dtype):
        parts = self._describe(weights, dtype)
        bf16 = all(is_bf16(w) for w in parts)
        # fp16 too: a float32 copy of the 7B fp16 checkpoint the HF hub ships would be 27 GB
        fp16 = all(w.dtype == np.float16 for w in parts)
        self.tiled = (bf16 or fp16) and self.dtype in TILED_DTYPES
        check_finite_fp16(parts, TILE_ELEMENTS)  # every float16 part, tiled or widened (inf would spread as NaN)
        if self.tiled:
            self.parts = parts
            # adjacent 16-bit pairs as one uint32
            # (needs an even in_features and contiguous rows; else whole rows are widened with a cast)
            self._paired = self.in_features % 2 == 0 and all(w.strides[-1] == w.itemsize for w in parts)
            self._stored = [w.view(np.uint32) if self._paired else w.view(np.uint16) if bf16 else w for w in parts]
            self._even, self._odd = (fp16_pair_even, fp16_pair_odd) if fp16 else (bf16_pair_even, bf16_pair_odd)
        else:
            floats = [to_float(w, self.dtype) for w in parts]
            self.weight = floats[0] if len(floats) == 1 else np.concatenate(floats)
            self.parts = self._stored = [self.weight]
            self._paired = False
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
        if not self.tiled and self.weight.size < SPLIT_ELEMENTS:  # one thread (a hand-off costs more)
            if x.size == self.in_features:  # one row: (in,) -> (out,) by row dot products
                return row_dots(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], self.out_features)
            return x @ self.weight.T
        lead = x.shape[:-1]
        x2 = np.asarray(x, dtype=self.dtype).reshape(-1, self.in_features)
        return self._tiled_matmul(x2).reshape(*lead, self.out_features)

    # --- tiles ----------------------------------------------------------------------------

    def _tiles(self, n: int) -> tuple[int, list]:
        """Rows per tile for ``n`` input rows, and the tiles: (stored rows, first, end output row)."""
        elements = (SPLIT_ELEMENTS if not self.tiled else BIG_TILE_ELEMENTS if n > FEW_ROWS
                    else INT8_TILE_ELEMENTS if isinstance(self, Int8Linear) else _decode_tile or TILE_ELEMENTS)
        width = self.in_features // 2 if self._paired else self.in_features  # widened at a time
        rows = max(1, elements // width)
        if rows not in self._plans:
            self._plans[rows] = tile_plan(self._stored, rows)
        return rows, self._plans[rows]

    def _tiled_matmul(self, x2: np.ndarray) -> np.ndarray:
        """x2 (n, in) @ W.T -> (n, out), tile by tile on our threads."""
        n = x2.shape[0]
        if n >= WHOLE_ROWS and self.dtype == np.float32:
            return self._whole_matmul(x2)
        rows, tiles = self._tiles(n)
        if self._paired:
            cols, kernel, width = [x2[:, 0::2], x2[:, 1::2]], self._pair_kernel, self.in_features // 2
        else:
            cols, width = [x2], self.in_features
            kernel = self._cast_kernel if self.tiled else self._float_kernel
        # ops: for each part of x (even / odd columns, or all), the (x, y) pairs one tile multiplies
        # into y[c0:c1]: one GEMV per input row up to GEMV_ROWS rows (a tile stays in L2 for all of
        # them), else one GEMM with x (in', n) and y (out, n)
        per_row = n == 1 or (self.tiled and n <= GEMV_ROWS)
        if per_row:
            ys = [np.empty((n, self.out_features), self.dtype) for _ in cols]
            ops = [[(np.ascontiguousarray(c[i]), y[i]) for i in range(n)] for c, y in zip(cols, ys)]
        else:
            ys = [np.empty((self.out_features, n), self.dtype) for _ in cols]
            ops = [[(np.ascontiguousarray(c).T, y)] for c, y in zip(cols, ys)]
        run_tiles(lambda queue: kernel(queue, rows, width, ops), tiles)
        if per_row:  # (n, out)
            return ys[0] if len(ys) == 1 else np.add(ys[0], ys[1], out=ys[0])
        y = np.empty((n, self.out_features), self.dtype)
        if len(ys) == 1:
            np.copyto(y, ys[0].T)
        else:
            np.add(ys[0].T, ys[1].T, out=y)
        return y

    def _whole_matmul(self, x2: np.ndarray) -> np.ndarray:
        """Many rows: the whole matrix widened once (our threads, tile by tile) into a shared buffer,
        then x2 (n, in) @ W.T -> (n, out) as one sgemm on BLAS's threads."""
        if not self.tiled:
            with blas_threads(None):
                return x2 @ self.weight.T
        rows, tiles = self._tiles(x2.shape[0])
        halves = 2 if self._paired else 1  # paired: even columns, then odd ones, each (out, in / 2)
        wide = _whole_buffer(self.out_features * self.in_features).reshape(halves, self.out_features, -1)

        def work(queue):
            for t, c0, c1 in queue:
                if self._paired:
                    self._even(t, wide[0, c0:c1].view(np.uint32))
                    self._odd(t, wide[1, c0:c1].view(np.uint32))
                else:
                    self._widen(t, wide[0, c0:c1])

        run_tiles(work, tiles)
        cols = [x2[:, 0::2], x2[:, 1::2]] if self._paired else [x2]
        with blas_threads(None):
            y = np.dot(cols[0], wide[0].T)
            for c, w in zip(cols[1:], wide[1:]):
                y += np.dot(c, w.T)
        return y

    def _pair_kernel(self, queue, rows: int, width: int, ops: list) -> None:
        """Widen 16-bit pairs (uint32) of each tile: even columns, then odd, each times its half of x."""
        even, odd = ops
        bits = _buffer("bits", (rows, width), np.uint32)
        wide32 = bits.view(np.float32)
        wide = wide32 if self.dtype == np.float32 else _buffer("wide", (rows, width), self.dtype)
        for p, c0, c1 in queue:
            k = c1 - c0
            b, w = (bits, wide) if k == rows else (bits[:k], wide[:k])
            self._even(p, b)
            if w is not wide32:
                np.copyto(w, wide32[:k])
            for x, y in even:
                np.dot(w, x, out=y[c0:c1])
            self._odd(p, b)
            if w is not wide32:
                np.copyto(w, wide32[:k])
            for x, y in odd:
                np.dot(w, x, out=y[c0:c1])

    def _float_kernel(self, queue, rows: int, width: int, ops: list) -> None:
        """Weights already in the compute dtype: each block of rows times x."""
        ((x, y),) = ops[0]
        dot = row_dots if x.ndim == 1 else np.dot  # one input row (decoding) / a GEMM
        for w, c0, c1 in queue:
            dot(w, x, out=y[c0:c1])

    def _cast_kernel(self, queue, rows: int, width: int, ops: list) -> None:
        """Widen each tile with one cast into the compute dtype, times all of x."""
        (pairs,) = ops
        wide = _buffer("wide", (rows, width), self.dtype)
        for t, c0, c1 in queue:
            k = c1 - c0
            w = wide if k == rows else wide[:k]
            self._widen(t, w)
            for x, y in pairs:
                np.dot(w, x, out=y[c0:c1])

    def _widen(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Stored rows into ``out`` in the compute dtype, whole rows at once: bf16 bits (uint16) are
        shifted into a float32's high half; fp16 and int8 are cast."""
        if stored.dtype != np.uint16:
            np.copyto(out, stored, casting="unsafe")
            return
        bits = out.view(np.uint32) if out.dtype == np.float32 else _buffer("bits", out.shape, np.uint32)
        np.left_shift(stored, np.uint32(16), out=bits, dtype=np.uint32)
        if out.dtype != np.float32:
            np.copyto(out, bits.view(np.float32))


class QuantizedTensor:
    """An int8 matrix with one float32 scale per row: W ~ q * scale[:, None].

    What a quantized checkpoint holds for each weight matrix (``q`` usually a
    memory map); ``Int8Linear`` uses it as is instead of quantizing again.
    """

    dtype = np.dtype(np.int8)
    ndim = 2

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != q.shape[:1]:
            raise ValueError(f"need int8 (out, in) values and (out,) scales, got {q.dtype} {q.shape} "
                             f"and {scale.shape}")
        self.q, self.scale = q, scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


class Int8Linear(Linear):
    """Weight-only int8: W ~ q * scale[:, None], q int8 (out, in), one scale per output row.

    Symmetric, round to nearest, scale = max|row| / 127. The scale is applied
    to the output (y = (x @ q.T) * scale), so widening a tile is a plain
    int8 -> float cast. Weights already quantized (``QuantizedTensor``) are
    used as they are.
    """

    def __init__(self, weights: np.ndarray | Sequence[np.ndarray | QuantizedTensor], dtype: np.dtype):
        parts = self._describe(weights, dtype)
        quantized = [w if isinstance(w, QuantizedTensor) else QuantizedTensor(*quantize_int8(w)) for w in parts]
        self.parts = self._stored = [w.q for w in quantized]  # stacked parts are not copied
        self.scale = np.concatenate([w.scale for w in quantized]).astype(self.dtype)  # (out_features,)
        self.tiled, self._paired = True, False
        self._plans: dict[int, list] = {}

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


def tile_plan(parts: list[np.ndarray], step: int) -> list[tuple[np.ndarray, int, int]]:
    """(stored rows, first and end output column) of every tile of ``step`` rows, in output order.

    Any stored form works (bf16 pairs as uint32, int8, quantized blocks as rows of bytes): a
    kernel takes tiles from this list, widens each into its thread's buffer and multiplies.

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


def row_dots(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w (out, in) @ x (in,) -> (out,), a dot product per row (``np.vecdot``; NumPy < 2: ``np.dot``): w is
    read front to back in one stream, where OpenBLAS's GEMV reads several rows at once (32000 x 768 float32,
    Zen 4, one / two threads: GEMV 13-15 / 21-24 GB/s, vecdot 21-30 / 31-34; read bandwidth 32 GB/s)."""
    return _vecdot(w, x, out=out)


_vecdot = getattr(np, "vecdot", None) or (lambda w, x, out=None: np.dot(w, x, out=out))
_whole: list[np.ndarray] = []  # the one float32 buffer of _whole_matmul, grown to the largest matrix


def _whole_buffer(size: int) -> np.ndarray:
    """``size`` float32 values of the buffer shared by every Linear's whole-matrix products."""
    if not _whole or _whole[0].size < size:
        _whole[:] = [np.empty(size, np.float32)]
    return _whole[0][:size]


def run_tiles(kernel, tiles: Sequence) -> None:
    """``kernel(queue)`` on our threads (at most one per tile), all taking the next tile from one shared
    queue when done with one: how every tiled product runs (``Linear``'s, ``model.quant_blocks``')."""
    queue = iter(tiles)
    run_parallel(lambda _: kernel(queue), range(max(1, min(num_threads(), len(tiles)))))


def thread_buffer(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """This thread's reusable buffer ``name`` as an array of ``shape`` (grown when too small)."""
    size = int(np.prod(shape))
    buffers = _workspace.__dict__.setdefault("buffers", {})
    flat = buffers.get((name, dtype))
    if flat is None or flat.size < size:
        flat = buffers[(name, dtype)] = np.empty(size, dtype=dtype)
    return flat[:size].reshape(shape)


_buffer = thread_buffer  # the name the kernels above use
