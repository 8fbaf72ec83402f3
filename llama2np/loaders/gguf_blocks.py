"""ggml's quantized blocks decoded into codes, scales and offsets (``model.quant_blocks``' exact form).

Block layouts as ggml writes them (``ggml-common.h``; fp16 numbers little-endian):

========  =====  ==========================================================================
type      bytes  layout of one block                         -> w = s * q - o, per sub-block
========  =====  ==========================================================================
Q8_0      34     d, 32 int8 q                                  s = d, q in -127..127
Q4_0      18     d, 16 bytes: q_j low nibble, q_j+16 high        s = d, q = nibble - 8
Q4_1      20     d, m, 16 bytes as Q4_0                         s = d, o = -m, q = nibble
Q5_0      22     d, qh (32 high bits), 16 bytes as Q4_0        s = d, q = nibble | bit << 4 - 16
Q5_1      24     d, m, qh, 16 bytes                             s = d, o = -m
Q2_K      84     16 scale bytes (low: sc, high: m), 64 bytes    16 sub-blocks of 16:
                 of 2-bit q, d, dmin                            s = d * sc, o = dmin * m
Q3_K      110    32 bytes high bits, 64 bytes 2-bit q,          16 of 16: s = d * (sc6 - 32),
                 12 bytes of 6-bit scales, d                    q = low | high << 2 - 4
Q4_K      144    d, dmin, 12 bytes of 6-bit sc / m, 128 bytes   8 of 32: s = d * sc, o = dmin * m
Q5_K      176    d, dmin, 12 bytes sc / m, 32 bytes high bits,  8 of 32: as Q4_K, q 5 bits
                 128 bytes of nibbles
Q6_K      210    128 bytes low nibbles, 64 bytes 2-bit highs,   16 of 16: s = d * sc (int8),
                 16 int8 scales, d                              q = low | high << 4 - 32
========  =====  ==========================================================================

In the k-quants a super-block of 256 weights is stored in halves of 128
(Q2_K, Q3_K, Q6_K) or quarters of 64 (Q4_K, Q5_K): within one, byte l holds
weight l of consecutive 32-wide groups in its successive bit fields. Each
decoder below returns the codes in weight order, so the result is checked
against ``gguf.quants.dequantize`` (an independent implementation) in the tests.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import CheckpointError
from ..model.quant_blocks import BlockQuantTensor
from ..model.threads import num_threads, run_parallel

#: (n, bytes) uint8 blocks -> (codes (n, weights per block) int8, scales (n, sub-blocks) float32, offsets or None)
Decoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]

_U8 = np.uint8


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 number at byte ``at`` of each block as float32 (exact): (n, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(n, m) bytes -> (n, 2m): the m low nibbles, then the m high ones."""
    return np.concatenate([packed & _U8(0x0F), packed >> _U8(4)], axis=1)


def _fields(packed: np.ndarray, bits: int) -> np.ndarray:
    """(n, groups, 32) bytes -> (n, groups, 8 // bits, 32): successive ``bits``-wide fields, lowest first."""
    shifts = np.arange(0, 8, bits, dtype=_U8).reshape(1, 1, -1, 1)
    return (packed[:, :, None, :] >> shifts) & _U8((1 << bits) - 1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """The 32 bits of a little-endian uint32 (n, 4 bytes) as (n, 32) values 0/1, bit j at place j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q8_0(b: np.ndarray) -> Decoded:
    return b[:, 2:34].view(np.int8), _f16(b, 0), None


def _q4_0(b: np.ndarray) -> Decoded:
    return (_nibbles(b[:, 2:18]).view(np.int8) - np.int8(8)), _f16(b, 0), None


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:20]).view(np.int8), _f16(b, 0), -_f16(b, 2)


def _q5(low: np.ndarray, qh: np.ndarray) -> np.ndarray:
    return (_nibbles(low) | (_high_bits(qh) << _U8(4))).view(np.int8)


def _q5_0(b: np.ndarray) -> Decoded:
    return _q5(b[:, 6:22], b[:, 2:6]) - np.int8(16), _f16(b, 0), None


def _q5_1(b: np.ndarray) -> Decoded:
    return _q5(b[:, 8:24], b[:, 4:8]), _f16(b, 0), -_f16(b, 2)


def _q2_k(b: np.ndarray) -> Decoded:
    n = len(b)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 256)  # halves x 4 fields x 32
    scales = b[:, 0:16]
    return (q.view(np.int8), _f16(b, 80) * (scales & _U8(0x0F)).astype(np.float32),
            _f16(b, 82) * (scales >> _U8(4)).astype(np.float32))


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales: low nibbles of bytes 0-7 then their high nibbles,
    plus 2 high bits each from bytes 8-11 (scale k: byte 8 + k % 4, field k // 4)."""
    low = _nibbles(s[:, 0:8])  # (n, 16)
    high = (s[:, None, 8:12] >> (2 * np.arange(4, dtype=_U8)).reshape(1, 4, 1)) & _U8(3)  # (n, 4 fields, 4 bytes)
    return (low | (high.reshape(-1, 16) << _U8(4))).astype(np.int8) - np.int8(32)


def _q3_k(b: np.ndarray) -> Decoded:
    n = len(b)
    low = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 256)
    high = _fields(b[:, None, 0:32], 1).reshape(n, 256)  # bit f of byte l: weight 32 f + l
    q = low.view(np.int8) - ((high ^ _U8(1)) << _U8(2)).view(np.int8)  # a clear high bit subtracts 4
    return q, _f16(b, 108) * _q3_k_scales(b[:, 96:108]).astype(np.float32), None


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins: sub-blocks 0-3 are the low 6 bits of
    bytes 0-3 (scales) and 4-7 (mins); 4-7 take a nibble of bytes 8-11 and the top 2 bits of 0-3 / 4-7."""
    first, second, rest = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([first & _U8(0x3F), (rest & _U8(0x0F)) | ((first >> _U8(6)) << _U8(4))], axis=1)
    m = np.concatenate([second & _U8(0x3F), (rest >> _U8(4)) | ((second >> _U8(6)) << _U8(4))], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _q4_k_low(packed: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 nibbles: quarter i holds weights 64 i .. 64 i + 31 low, 64 i + 32 .. high."""
    return _fields(packed.reshape(len(packed), 4, 32), 4).reshape(len(packed), 256)


def _q4_k(b: np.ndarray) -> Decoded:
    sc, m = _k_scales(b[:, 4:16])
    return _q4_k_low(b[:, 16:144]).view(np.int8), _f16(b, 0) * sc, _f16(b, 2) * m


def _q5_k(b: np.ndarray) -> Decoded:
    sc, m = _k_scales(b[:, 4:16])
    high = _fields(b[:, None, 16:48], 1).reshape(len(b), 256)  # bit f of byte l: weight 32 f + l
    return (_q4_k_low(b[:, 48:176]) | (high << _U8(4))).view(np.int8), _f16(b, 0) * sc, _f16(b, 2) * m


def _q6_k(b: np.ndarray) -> Decoded:
    n = len(b)
    low = b[:, 0:128].reshape(n, 2, 64)
    low = np.concatenate([low & _U8(0x0F), low >> _U8(4)], axis=2)  # (n, halves, 128)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 2, 128)
    q = (low | (high << _U8(4))).reshape(n, 256).view(np.int8) - np.int8(32)
    return q, _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32), None


#: type name -> (weights per block, sub-block size, block bytes, decoder, lowest code, highest code)
KINDS: dict[str, tuple[int, int, int, Callable[[np.ndarray], Decoded], int, int]] = {
    "Q8_0": (32, 32, 34, _q8_0, -127, 127), "Q4_0": (32, 32, 18, _q4_0, -8, 7),
    "Q4_1": (32, 32, 20, _q4_1, 0, 15), "Q5_0": (32, 32, 22, _q5_0, -16, 15),
    "Q5_1": (32, 32, 24, _q5_1, 0, 31), "Q2_K": (256, 16, 84, _q2_k, 0, 3),
    "Q3_K": (256, 16, 110, _q3_k, -4, 3), "Q4_K": (256, 32, 144, _q4_k, 0, 15),
    "Q5_K": (256, 32, 176, _q5_k, 0, 31), "Q6_K": (256, 16, 210, _q6_k, -32, 31),
}

#: blocks decoded at a time (a few MiB of temporaries per thread)
_CHUNK_WEIGHTS = 1 << 20


def supported(kind: str) -> bool:
    return kind in KINDS


def form_bytes(kind: str, rows: int, cols: int) -> int:
    """Bytes a (rows, cols) tensor of ``kind`` takes as a BlockQuantTensor."""
    _, sub, _, decode, _, _ = KINDS[kind]
    asymmetric = kind in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")
    return rows * cols + rows * (cols // sub) * 4 * (2 if asymmetric else 1)


def decode_tensor(data: np.ndarray, kind: str, shape: tuple[int, int], name: str) -> BlockQuantTensor:
    """A GGUF tensor's raw blocks (uint8, any shape) as a BlockQuantTensor of ``shape`` (rows, cols).

    Decoded on our threads a chunk of rows at a time. A tensor whose byte count does not match its
    shape (a truncated block), a scale or offset that is NaN or infinite, or a code outside its type's
    range is a CheckpointError naming ``name``.
    """
    per_block, sub, size, decode, low, high = KINDS[kind]
    rows, cols = shape
    if cols % per_block:
        raise CheckpointError(f"tensor {name}: {cols} columns are not whole {kind} blocks of {per_block}")
    blocks_per_row = cols // per_block
    if data.nbytes != rows * blocks_per_row * size:
        raise CheckpointError(f"tensor {name}: {data.nbytes} bytes of {kind} data, but {rows} x {cols} needs "
                              f"{rows * blocks_per_row * size} (a truncated block?)")
    raw = data.reshape(-1).view(np.uint8).reshape(rows, blocks_per_row * size)
    n_sub = cols // sub
    q = np.empty((rows, sub, n_sub), np.int8)  # position-in-block major (see model.quant_blocks)
    scale = np.empty((rows, n_sub), np.float32)
    asymmetric = kind in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")
    offset = np.empty((rows, n_sub), np.float32) if asymmetric else None
    step = max(1, _CHUNK_WEIGHTS // cols)
    starts = range(0, rows, step)
    problems: list[str] = []

    def work(chunk: Sequence[int]) -> None:
        for r0 in chunk:
            r1 = min(r0 + step, rows)
            codes, s, o = decode(raw[r0:r1].reshape(-1, size))
            if low == -127 and (codes == -128).any() or not np.isfinite(s).all() or (
                    o is not None and not np.isfinite(o).all()):
                problems.append(_problem(kind, codes, s, o, low, high, r0, r1, blocks_per_row))
                return
            q[r0:r1] = codes.reshape(r1 - r0, n_sub, sub).transpose(0, 2, 1)
            scale[r0:r1] = s.reshape(r1 - r0, n_sub)
            if offset is not None:
                offset[r0:r1] = o.reshape(r1 - r0, n_sub)

    n = max(1, min(num_threads(), len(starts)))
    run_parallel(work, [starts[i::n] for i in range(n)])
    if problems:
        raise CheckpointError(f"tensor {name}: {problems[0]}")
    return BlockQuantTensor(q, scale, offset, kind)


def _problem(kind, codes, s, o, low, high, r0, r1, blocks_per_row) -> str:
    """What is wrong in rows r0..r1 of a decoded tensor, for the error message."""
    if not np.isfinite(s).all():
        block = int(np.argmin(np.isfinite(s).all(axis=1)))
        return (f"a {kind} scale is NaN or infinite (row {r0 + block // blocks_per_row}, block "
                f"{block % blocks_per_row}): the file is damaged")
    if o is not None and not np.isfinite(o).all():
        block = int(np.argmin(np.isfinite(o).all(axis=1)))
        return (f"a {kind} offset is NaN or infinite (row {r0 + block // blocks_per_row}, block "
                f"{block % blocks_per_row}): the file is damaged")
    block = int(np.argmax((codes < low).any(axis=1) | (codes > high).any(axis=1)))
    return (f"a {kind} code is outside {low}..{high} (row {r0 + block // blocks_per_row}, block "
            f"{block % blocks_per_row}): no quantizer writes it, the file is damaged")
