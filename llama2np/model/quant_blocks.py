"""Block-quantized weights kept as their own values: int8 codes with per-block float32 scales and offsets.

llama.cpp's common quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
k-quants Q2_K..Q6_K) store each weight as a small integer code ``q`` of a block
of 16 or 32 weights, with one scale ``s`` and (for the asymmetric types) one
offset ``o`` per block:

    w = s * q - o

The codes fit int8 (at most 6 bits plus a sign), and every ``s`` and ``o`` is an
fp16 number times a small integer (k-quants: the super-block's fp16 ``d`` times a
4- or 6-bit sub-block scale), at most 17 significant bits, so both are exact in
float32. ``s * q`` then has at most 23 significant bits: exact in float32, and
``s * q - o`` is exact in float64. ``BlockQuantTensor`` holds that form (1 byte
a weight plus 4 or 8 bytes per block: 1.125 to 1.5 bytes a weight) and
``BlockLinear`` multiplies with it a slab of blocks at a time on ``Linear``'s
threads (``linear.run_tiles``):

    y = x @ W.T = (x @ (s * q).T) - (sum of x over each block) @ o.T

The offsets meet x's block sums in one small product of 1/16 or 1/32 of the
work. No float copy of a whole matrix is made, nothing is rounded below the
compute dtype.

Layout. Each tensor is held block-major and transposed: codes (blocks, B, rows),
scales and offsets (blocks, rows), where "blocks" counts the (sub-)blocks of a
row. Then one block of every row is a contiguous (B, rows) slab, and a product
needs no multiply by the scales per weight:

* Decoding (one input row): each slab is widened with one cast and
  multiplied by x's B values of that block, P[b] = x_b @ q_b (g GEMVs in one
  batched matmul), and the scales meet those per-block partial sums once:
  y = sum_b s_b * P[b]. That is 1/B of the work of scaling every weight, so a
  weight costs one cast and its share of a GEMV, as an int8 row-scaled weight does.
* Prefill (more rows): slabs of several blocks are widened to s * q (a cast and
  a multiply whose inner loop runs along a whole row of the slab) and multiplied
  by the matching columns of x as one GEMM. (The two paths round differently in
  float32; in float64 they agree to rounding, ~1e-14.) Slabs of whole rows: a
  tile of a few output rows would read the codes in short strided runs, and
  such casts ran at half the rate.

Decoding the file's blocks straight into this layout (``loaders.gguf_blocks``)
starts from a byte transpose of the blocks, after which every bit operation
runs along rows: long inner loops.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .linear import TILE_ELEMENTS, Linear, run_tiles, thread_buffer

#: the dtype ``BlockQuantTensor`` reports (and GGUF specs give before a tensor is built): a marker,
#: so validation can tell these tensors from plain int8 arrays
BLOCKS_DTYPE = np.dtype([("blocks", "i1")])
#: widened values per decoding tile: the int8 cast's set-up wants big tiles, 4 MiB of float32 still sits in
#: the L3 (7B layer, 2 threads, x bf16: 512K 0.79, 1M 0.95, 2M 0.86, 4M 0.52)
DECODE_TILE_ELEMENTS = 1024 * 1024
#: widened values per prefill slab: OpenBLAS's 16-row GEMM runs faster over longer blocks of rows (one
#: thread, 7B shapes, G weights/s: 11008 rows 1.13 at 1 block a slab, 1.47 at 4; 4096 rows 0.95 at 4, 0.99 at 8)
PREFILL_TILE_ELEMENTS = 1536 * 1024


class BlockQuantTensor:
    """A (rows, cols) matrix as int8 codes, per-block float32 scales and (optionally) offsets.

    ``q``: (blocks, B, rows) int8; ``scale``, ``offset``: (blocks, rows) float32 (``offset`` None: all
    zero), where column ``b * B + k`` of row r has the value ``scale[b, r] * q[b, k, r] - offset[b, r]``;
    ``kind``: the name of the quantization the values came from (Q4_K, ...), for messages.
    ``w[i]`` (any NumPy index of rows) gives those rows' values in float64, exactly.
    """

    dtype = BLOCKS_DTYPE
    ndim = 2

    def __init__(self, q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, kind: str = "blocks"):
        n_blocks, block, rows = q.shape
        if q.dtype != np.int8 or scale.shape != (n_blocks, rows) or scale.dtype != np.float32 or (
                offset is not None and (offset.shape != scale.shape or offset.dtype != np.float32)):
            raise ValueError(f"need int8 (blocks, B, rows) codes and float32 (blocks, rows) scales/offsets, got "
                             f"{q.dtype} {q.shape}, {scale.dtype} {scale.shape}"
                             + ("" if offset is None else f", {offset.dtype} {offset.shape}"))
        self.q, self.scale, self.offset, self.kind = q, scale, offset, kind

    @property
    def block(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[2], self.q.shape[0] * self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes)

    def __getitem__(self, index) -> np.ndarray:
        """Rows ``index`` as float64 values s * q - o in column order: (..., cols)."""
        q = self.q[:, :, index]  # (blocks, B, ...)
        w = q.astype(np.float64) * self.scale[:, None, index]
        if self.offset is not None:
            w -= self.offset[:, None, index]
        w = np.moveaxis(w, (0, 1), (-2, -1))  # (..., blocks, B)
        return w.reshape(*w.shape[:-2], self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole matrix as floats (float64 unless ``dtype`` says otherwise), a tile of rows at a time."""
        out = np.empty(self.shape, dtype=dtype or np.float64)
        step = max(1, TILE_ELEMENTS // self.shape[1])
        for r0 in range(0, self.shape[0], step):
            out[r0:r0 + step] = self[r0:r0 + step]
        return out

    def cut(self, a: int, b: int, columns: bool) -> "BlockQuantTensor":
        """Rows (or columns) [a, b) as a new, contiguous tensor; columns must be whole blocks."""
        if not columns:
            offset = None if self.offset is None else self.offset[:, a:b].copy()
            return BlockQuantTensor(self.q[:, :, a:b].copy(), self.scale[:, a:b].copy(), offset, self.kind)
        if a % self.block or b % self.block:
            raise ValueError(f"columns {a}..{b} of a {self.kind} matrix split its blocks of {self.block}")
        ba, bb = a // self.block, b // self.block
        offset = None if self.offset is None else self.offset[ba:bb].copy()
        return BlockQuantTensor(self.q[ba:bb].copy(), self.scale[ba:bb].copy(), offset, self.kind)


class BlockLinear(Linear):
    """``Linear`` over BlockQuantTensors of one block size, stacked by rows: y = x @ (s*q - o).T.

    Tiles are slabs of whole blocks of one part, (g blocks, B, rows of the part), run on our threads
    by ``linear.run_tiles``; each thread sums its tiles' outputs into its own y, added at the end.
    """

    def __init__(self, weights: Sequence[BlockQuantTensor], dtype: np.dtype):
        parts = self._describe(list(weights), dtype)
        self.block = parts[0].block
        if any(w.block != self.block for w in parts):
            raise ValueError(f"stacked block-quantized parts need one block size, got {[w.block for w in parts]}")
        self.parts = parts
        self.tiled, self._paired = True, False
        if all(w.offset is None for w in parts):
            self.offset = None
        else:  # (blocks, out_features); a symmetric part among asymmetric ones has zero offsets
            self.offset = np.concatenate([w.offset if w.offset is not None else np.zeros(w.scale.shape, np.float32)
                                          for w in parts], axis=1)
        self._plans: dict[tuple, list] = {}

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.parts)

    def slabs(self, elements: int) -> list[tuple]:
        """The decode tiles of about ``elements`` widened values, made once (a step walks thousands):
        (codes (g, B, rows), scales (g, 1, rows), first block, first and end output column)."""
        key = ("slabs", elements)
        if key not in self._plans:
            plan = []
            for w, (c0, c1) in zip(self.parts, self._bounds):
                g = max(1, elements // (self.block * w.shape[0]))  # blocks per tile
                plan += [(w.q[b0:b0 + g], w.scale[b0:b0 + g, None, :], b0, c0, c1)
                         for b0 in range(0, w.q.shape[0], g)]
            self._plans[key] = plan
        return self._plans[key]

    def offset_tiles(self, elements: int) -> list[tuple]:
        """The offsets in tiles of about ``elements`` values, for the decode queue: (None, offsets
        (blocks, columns), 0, first and end output column); none when there are no offsets."""
        key = ("offsets", elements)
        if key not in self._plans:
            plan = []
            if self.offset is not None:
                cols = max(1, elements // self.offset.shape[0])
                plan = [(None, self.offset[:, c0:c0 + cols], 0, c0, min(c0 + cols, self.out_features))
                        for c0 in range(0, self.out_features, cols)]
            self._plans[key] = plan
        return self._plans[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (..., in_features) -> (..., out_features)
        lead = x.shape[:-1]
        x2 = np.asarray(x, dtype=self.dtype).reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            y = self._decode(x2.reshape(-1, self.block))  # (1, out)
        else:
            y = self._prefill(x2)  # (n, out)
            if self.offset is not None:
                x_sums = x2.reshape(x2.shape[0], -1, self.block).sum(axis=2)  # (n, blocks)
                y -= np.dot(x_sums, self.offset)  # (n, blocks) @ (blocks, out)
        return y.astype(self.dtype, copy=False).reshape(*lead, self.out_features)

    def _decode(self, xb: np.ndarray) -> np.ndarray:
        """One input row, xb (blocks, B): P[b] = x_b @ q_b for each block, y = sum_b s_b * P[b] - o_b * sum(x_b)
        -> (1, out)."""
        codes = self.slabs(DECODE_TILE_ELEMENTS)
        largest = max(t[0].size for t in codes)
        x_sums = xb.sum(axis=1) if self.offset is not None else None  # (blocks,)
        ys: list[np.ndarray] = []

        def work(queue) -> None:
            # this thread's share of the sum, in float64: the partial sums of hundreds of tiles are added
            # here, and a float32 sum drifted from the prefill path's by more than 1e-5
            y = np.zeros((1, self.out_features), np.float64)
            ys.append(y)
            slab = thread_buffer("slab", (largest,), self.dtype)
            sums = thread_buffer("partial", (largest // self.block,), self.dtype)
            for q, s, b0, c0, c1 in queue:
                if q is None:  # offsets (blocks, c1 - c0)
                    y[0, c0:c1] -= np.dot(x_sums, s)
                    continue
                g, _, rows = q.shape
                wide = slab[:q.size].reshape(q.shape)
                np.copyto(wide, q, casting="unsafe")  # codes, exact
                p = sums[:g * rows].reshape(g, 1, rows)
                np.matmul(xb[b0:b0 + g, None, :], wide, out=p)  # (g, 1, B) @ (g, B, rows): g GEMVs, one call
                # sum_b s_b * P[b] in the compute dtype: a float32 product rounds once more per block, as the
                # GEMV's own sums do (a float64 one cost 10-15 % of a step in casts)
                y[0, c0:c1] += np.einsum("jkr,jkr->r", p, s)

        # the offsets first, so that the threads end on the codes' many small tiles
        run_tiles(work, self.offset_tiles(DECODE_TILE_ELEMENTS) + codes)
        return _sum(ys)

    def _prefill(self, x2: np.ndarray) -> np.ndarray:
        """More rows, x2 (n, in): per slab, (s * q) of its g blocks times x2's columns of those blocks,
        one GEMM -> (n, out)."""
        n = x2.shape[0]
        tiles = self.slabs(PREFILL_TILE_ELEMENTS)
        largest = max(t[0].size for t in tiles)
        ys: list[np.ndarray] = []

        def work(queue) -> None:
            y = np.zeros((n, self.out_features), np.float64)  # this thread's share, summed over its slabs
            ys.append(y)
            slab = thread_buffer("slab", (largest,), self.dtype)
            for q, s, b0, c0, c1 in queue:
                g, _, rows = q.shape
                wide = slab[:q.size].reshape(q.shape)
                np.copyto(wide, q, casting="unsafe")  # codes, exact
                np.multiply(wide, s, out=wide)  # s * q: exact in float32
                cols = x2[:, b0 * self.block:(b0 + g) * self.block]
                y[:, c0:c1] += np.dot(cols, wide.reshape(g * self.block, rows))

        run_tiles(work, tiles)
        return _sum(ys)


def _sum(ys: list[np.ndarray]) -> np.ndarray:
    """The threads' shares of a sum, added into the first."""
    for other in ys[1:]:
        ys[0] += other
    return ys[0]


class StackedLinear(Linear):
    """Matrices of different kinds (block sizes, float) that one input feeds: each its own Linear,
    outputs side by side as one stacked ``Linear`` would give them."""

    def __init__(self, members: Sequence[Linear], dtype: np.dtype):
        self.members = list(members)
        self.dtype = np.dtype(dtype)
        self.sizes = [s for m in self.members for s in m.sizes]
        self.in_features, self.out_features = self.members[0].in_features, sum(self.sizes)
        ends = np.cumsum(self.sizes).tolist()
        self._bounds = list(zip([0] + ends[:-1], ends))
        self.parts = [p for m in self.members for p in m.parts]
        self.tiled = any(m.tiled for m in self.members)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([m(x) for m in self.members], axis=-1)


def is_block_quantized(w) -> bool:
    return isinstance(w, BlockQuantTensor)


def make_block_linear(weights: Sequence, dtype: np.dtype) -> Linear:
    """One Linear over ``weights`` of which some are BlockQuantTensors: a BlockLinear when all share
    a block size, else one Linear per run of like parts, stacked."""
    def kind(w):
        return w.block if is_block_quantized(w) else None

    runs: list[list] = []
    for w in weights:
        if runs and kind(runs[-1][0]) == kind(w):
            runs[-1].append(w)
        else:
            runs.append([w])
    members = [BlockLinear(run, dtype) if is_block_quantized(run[0]) else Linear(run, dtype) for run in runs]
    return members[0] if len(members) == 1 else StackedLinear(members, dtype)
