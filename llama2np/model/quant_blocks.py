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
``BlockLinear`` multiplies with it tile by tile, reusing ``Linear``'s tiles and
threads:

    y = x @ W.T = (x @ (s * q).T) - (sum of x over each block) @ o.T

Each tile of rows is widened to ``s * q`` in the compute dtype (one cast, one
multiply: exact) and multiplied by x; the offsets meet x's block sums in one
small product of 1/16 or 1/32 of the work. No float copy of a whole matrix is
made, nothing is rounded below the compute dtype.

Column order. The scale of a block is broadcast over the block's codes when a
tile is widened; NumPy runs such a broadcast at the speed of its inner loop,
which would be one block (16 or 32 values) long. So the codes of each row are
kept permuted, position-in-block major: column ``b * B + k`` (block b, place k)
is stored at ``k * n_blocks + b``, the scale then repeats with an inner loop a
whole row of blocks long, and x is permuted the same way before the product.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .linear import TILE_ELEMENTS, Linear

#: the dtype ``BlockQuantTensor`` reports (and GGUF specs give before a tensor is built): a marker,
#: so validation can tell these tensors from plain int8 arrays
BLOCKS_DTYPE = np.dtype([("blocks", "i1")])


class BlockQuantTensor:
    """A (rows, cols) matrix as int8 codes, per-block float32 scales and (optionally) offsets.

    ``q``: (rows, B, cols // B) int8, each row's codes position-in-block major (see the module
    docstring); ``scale``, ``offset``: (rows, cols // B) float32 (``offset`` None: all zero);
    ``kind``: the name of the quantization the values came from (Q4_K, ...), for messages.
    ``w[i]`` (any NumPy index of rows) gives those rows' values in float64, exactly.
    """

    dtype = BLOCKS_DTYPE
    ndim = 2

    def __init__(self, q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, kind: str = "blocks"):
        rows, block, n_blocks = q.shape
        if q.dtype != np.int8 or scale.shape != (rows, n_blocks) or scale.dtype != np.float32 or (
                offset is not None and (offset.shape != scale.shape or offset.dtype != np.float32)):
            raise ValueError(f"need int8 (rows, B, blocks) codes and float32 (rows, blocks) scales/offsets, got "
                             f"{q.dtype} {q.shape}, {scale.dtype} {scale.shape}"
                             + ("" if offset is None else f", {offset.dtype} {offset.shape}"))
        self.q, self.scale, self.offset, self.kind = q, scale, offset, kind

    @property
    def block(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * self.q.shape[2]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes)

    def __getitem__(self, index) -> np.ndarray:
        """Rows ``index`` as float64 values s * q - o in natural column order: (..., cols)."""
        q, s = self.q[index], self.scale[index]
        w = q.astype(np.float64) * s[..., None, :]  # (..., B, blocks)
        if self.offset is not None:
            w -= self.offset[index][..., None, :]
        return np.swapaxes(w, -1, -2).reshape(*q.shape[:-2], self.shape[1])

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
            offset = None if self.offset is None else self.offset[a:b].copy()
            return BlockQuantTensor(self.q[a:b].copy(), self.scale[a:b].copy(), offset, self.kind)
        if a % self.block or b % self.block:
            raise ValueError(f"columns {a}..{b} of a {self.kind} matrix split its blocks of {self.block}")
        ba, bb = a // self.block, b // self.block
        offset = None if self.offset is None else np.ascontiguousarray(self.offset[:, ba:bb])
        return BlockQuantTensor(np.ascontiguousarray(self.q[:, :, ba:bb]), np.ascontiguousarray(self.scale[:, ba:bb]),
                                offset, self.kind)


class _Rows:
    """Rows of a BlockQuantTensor as ``Linear``'s tile plan slices them: ``rows[r0:r1]``, ``rows.shape``."""

    __slots__ = ("q", "scale", "shape")

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        self.q, self.scale, self.shape = q, scale, q.shape

    def __getitem__(self, rows: slice) -> "_Rows":
        return _Rows(self.q[rows], self.scale[rows])


class BlockLinear(Linear):
    """``Linear`` over BlockQuantTensors of one block size, stacked by rows: y = x @ (s*q - o).T."""

    def __init__(self, weights: Sequence[BlockQuantTensor], dtype: np.dtype):
        parts = self._describe(list(weights), dtype)
        self.block = parts[0].block
        if any(w.block != self.block for w in parts):
            raise ValueError(f"stacked block-quantized parts need one block size, got {[w.block for w in parts]}")
        self.parts = parts
        self._stored = [_Rows(w.q, w.scale) for w in parts]
        self.tiled, self._paired = True, False
        if all(w.offset is None for w in parts):
            self.offset = None
        else:  # (out_features, blocks); a symmetric part among asymmetric ones has zero offsets
            self.offset = np.concatenate([w.offset if w.offset is not None else np.zeros(w.scale.shape, np.float32)
                                          for w in parts])
        self._plans: dict[int, list] = {}

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.parts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (..., in_features) -> (..., out_features)
        lead = x.shape[:-1]
        x3 = np.asarray(x, dtype=self.dtype).reshape(-1, self.in_features // self.block, self.block)  # (n, blocks, B)
        permuted = np.ascontiguousarray(x3.transpose(0, 2, 1)).reshape(x3.shape[0], -1)  # the codes' column order
        y = self._tiled_matmul(permuted)  # (n, out): x @ (s * q).T
        if self.offset is not None:
            y -= np.dot(x3.sum(axis=2), self.offset.T)  # (n, blocks) @ (blocks, out)
        return y.reshape(*lead, self.out_features)

    def _widen(self, stored: _Rows, out: np.ndarray) -> None:
        """s * q of a tile of rows into ``out`` (rows, in) in the compute dtype: exact (see the module docstring)."""
        out3 = out.reshape(stored.q.shape)  # (rows, B, blocks)
        np.copyto(out3, stored.q, casting="unsafe")
        np.multiply(out3, stored.scale[:, None, :], out=out3)


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
