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
weight l of consecutive 32-wide groups in its successive bit fields.

The blocks of a chunk of columns are first transposed as bytes, ``t`` =
(blocks, bytes, rows): byte j of a block is then a row-long vector, every bit
operation below runs along rows, and the codes land directly in
``model.quant_blocks``' layout, (sub-blocks, B, rows). Each decoder fills
``q`` (blocks, sub-blocks per block, B, rows) uint8 (the int8 codes' bits),
``s`` and ``o`` (blocks, sub-blocks per block, rows) float32; the tests check
the result against ``gguf.quants.dequantize`` (an independent implementation).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import CheckpointError
from ..model.quant_blocks import BlockQuantTensor
from ..model.threads import num_threads, run_parallel

_U8 = np.uint8


def _f16(t: np.ndarray, at: int) -> np.ndarray:
    """The fp16 number at byte ``at`` of each block as float32 (exact): (blocks, 1, rows)."""
    bits = t[:, at].astype(np.uint16) | (t[:, at + 1].astype(np.uint16) << np.uint16(8))
    return bits.view(np.float16).astype(np.float32)[:, None, :]


def _nibbles(src: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    np.bitwise_and(src, _U8(0x0F), out=low)
    np.right_shift(src, _U8(4), out=high)


def _bits(src: np.ndarray, shift: int, mask: int, out: np.ndarray) -> np.ndarray:
    """(src >> shift) & mask into ``out``."""
    np.right_shift(src, _U8(shift), out=out)
    np.bitwise_and(out, _U8(mask), out=out)
    return out


def _signed(q: np.ndarray, zero: int) -> None:
    """Codes stored with an offset of ``zero`` (Q4_0's 8, ...) -> their signed values, in place."""
    np.subtract(q.view(np.int8), np.int8(zero), out=q.view(np.int8))


def _high_bits(t: np.ndarray, at: int, q: np.ndarray) -> None:
    """Q5_0/Q5_1: bit j of the little-endian uint32 at byte ``at`` is bit 4 of weight j: q |= bit << 4."""
    shape = (len(t), 4, 8, t.shape[-1])  # (blocks, byte, bit, rows): weight 8 byte + bit
    tmp = np.empty(shape, _U8)
    for bit in range(8):
        _bits(t[:, at:at + 4], bit, 1, tmp[:, :, bit])
    tmp <<= _U8(4)
    q |= tmp.reshape(q.shape)


def _q8_0(t, q, s, o):
    q[:, 0] = t[:, 2:34]
    s[:] = _f16(t, 0)


def _q4(t, q, s, o, at: int, zero: int):
    q5 = q.reshape(len(t), 2, 16, -1)  # weight j: low nibble of byte j, weight 16 + j: its high nibble
    _nibbles(t[:, at:at + 16], q5[:, 0], q5[:, 1])
    return q


def _q4_0(t, q, s, o):
    _signed(_q4(t, q, s, o, 2, 8), 8)
    s[:] = _f16(t, 0)


def _q4_1(t, q, s, o):
    _q4(t, q, s, o, 4, 0)
    s[:], o[:] = _f16(t, 0), -_f16(t, 2)


def _q5_0(t, q, s, o):
    _high_bits(t, 2, _q4(t, q, s, o, 6, 16))
    _signed(q, 16)
    s[:] = _f16(t, 0)


def _q5_1(t, q, s, o):
    _high_bits(t, 4, _q4(t, q, s, o, 8, 0))
    s[:], o[:] = _f16(t, 0), -_f16(t, 2)


def _two_bit(t: np.ndarray, at: int, q: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes of 2-bit fields: weight 128 h + 32 f + l is field f of byte 32 h + l; sub-block
    (16) 8 h + 2 f + l // 16, place l % 16. ``q``: (blocks, 16, 16, rows) -> view (blocks, h, f, l // 16, 16, rows)."""
    n, rows = len(t), t.shape[-1]
    packed = t[:, at:at + 64].reshape(n, 2, 2, 16, rows)  # (blocks, h, l // 16, l % 16, rows)
    q6 = q.reshape(n, 2, 4, 2, 16, rows)
    for f in range(4):
        _bits(packed, 2 * f, 3, q6[:, :, f])
    return q6


def _q2_k(t, q, s, o):
    _two_bit(t, 16, q)
    sc = t[:, 0:16]
    s[:] = _f16(t, 80) * (sc & _U8(0x0F))
    o[:] = _f16(t, 82) * (sc >> _U8(4))


def _q3_k_scales(t: np.ndarray, at: int) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales (blocks, 16, rows): low nibbles of bytes 0-7 then their high
    nibbles, plus 2 high bits each from bytes 8-11 (scale k: byte 8 + k % 4, field k // 4)."""
    n, rows = len(t), t.shape[-1]
    sc = np.empty((n, 2, 8, rows), _U8)
    _nibbles(t[:, at:at + 8], sc[:, 0], sc[:, 1])
    high = np.empty((n, 4, 4, rows), _U8)  # (blocks, field, byte, rows): scale 4 field + byte
    for f in range(4):
        _bits(t[:, at + 8:at + 12], 2 * f, 3, high[:, f])
    sc = sc.reshape(n, 16, rows) | (high.reshape(n, 16, rows) << _U8(4))
    return sc.view(np.int8) - np.int8(32)


def _q3_k(t, q, s, o):
    n, rows = len(t), t.shape[-1]
    q6 = _two_bit(t, 32, q)  # the low 2 bits
    hmask = t[:, 0:32].reshape(n, 2, 16, rows)  # bit 4 h + f of byte l: weight 128 h + 32 f + l
    bit = np.empty(hmask.shape, _U8)
    for h in range(2):
        for f in range(4):
            _bits(hmask, 4 * h + f, 1, bit)
            np.left_shift(bit, _U8(2), out=bit)
            q6[:, h, f] |= bit
    _signed(q, 4)  # a clear high bit: code - 4
    s[:] = _f16(t, 108) * _q3_k_scales(t, 96)


def _k_scales(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes at 4 -> 8 six-bit scales and 8 six-bit mins (blocks, 8, rows): sub-blocks 0-3
    are the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 take a nibble of bytes 8-11 and the top
    2 bits of 0-3 / 4-7."""
    first, second, rest = t[:, 4:8], t[:, 8:12], t[:, 12:16]
    sc = np.concatenate([first & _U8(0x3F), (rest & _U8(0x0F)) | ((first >> _U8(6)) << _U8(4))], axis=1)
    m = np.concatenate([second & _U8(0x3F), (rest >> _U8(4)) | ((second >> _U8(6)) << _U8(4))], axis=1)
    return sc, m


def _q4_k_low(t: np.ndarray, at: int, q: np.ndarray) -> None:
    """128 bytes -> 256 nibbles: quarter i holds weights 64 i .. 64 i + 31 low, 64 i + 32 .. high; sub-block
    (32) 2 i + (high), place l."""
    n, rows = len(t), t.shape[-1]
    packed = t[:, at:at + 128].reshape(n, 4, 32, rows)
    q5 = q.reshape(n, 4, 2, 32, rows)
    _nibbles(packed, q5[:, :, 0], q5[:, :, 1])


def _q4_k(t, q, s, o):
    _q4_k_low(t, 16, q)
    sc, m = _k_scales(t)
    s[:], o[:] = _f16(t, 0) * sc, _f16(t, 2) * m


def _q5_k(t, q, s, o):
    _q4_k_low(t, 48, q)
    high = t[:, 16:48]  # bit b of byte l: bit 4 of sub-block b's place l
    bit = np.empty(high.shape, _U8)
    for b in range(8):
        _bits(high, b, 1, bit)
        np.left_shift(bit, _U8(4), out=bit)
        q[:, b] |= bit
    sc, m = _k_scales(t)
    s[:], o[:] = _f16(t, 0) * sc, _f16(t, 2) * m


def _q6_k(t, q, s, o):
    """Weight 128 h + 32 f + l: low 4 bits = nibble f // 2 of byte 64 h + 32 (f % 2) + l, high 2 bits =
    field f of byte 128 + 32 h + l; sub-block (16) 8 h + 2 f + l // 16, place l % 16."""
    n, rows = len(t), t.shape[-1]
    low = t[:, 0:128].reshape(n, 2, 2, 2, 16, rows)  # (blocks, h, f % 2, l // 16, l % 16, rows)
    high = t[:, 128:192].reshape(n, 2, 2, 16, rows)  # (blocks, h, l // 16, l % 16, rows)
    q6 = q.reshape(n, 2, 4, 2, 16, rows)
    bits = np.empty(high.shape, _U8)
    for f in range(4):
        _bits(low[:, :, f % 2], 4 * (f // 2), 0x0F, q6[:, :, f])
        _bits(high, 2 * f, 3, bits)
        np.left_shift(bits, _U8(4), out=bits)
        q6[:, :, f] |= bits
    _signed(q, 32)
    s[:] = _f16(t, 208) * t[:, 192:208].view(np.int8)


#: type name -> (weights per block, sub-block size, block bytes, decoder, lowest code, highest code)
KINDS: dict[str, tuple[int, int, int, Callable[..., None], int, int]] = {
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

    Decoded on our threads a chunk of columns (whole blocks) at a time. A tensor whose byte count does
    not match its shape (a truncated block), a scale or offset that is NaN or infinite, or a code
    outside its type's range is a CheckpointError naming ``name``.
    """
    per_block, sub, size, decode, low, high = KINDS[kind]
    rows, cols = shape
    if cols % per_block:
        raise CheckpointError(f"tensor {name}: {cols} columns are not whole {kind} blocks of {per_block}")
    blocks_per_row = cols // per_block
    if data.nbytes != rows * blocks_per_row * size:
        raise CheckpointError(f"tensor {name}: {data.nbytes} bytes of {kind} data, but {rows} x {cols} needs "
                              f"{rows * blocks_per_row * size} (a truncated block?)")
    raw = data.reshape(-1).view(np.uint8).reshape(rows, blocks_per_row, size)
    per_sub = per_block // sub  # sub-blocks of a block
    q = np.empty((blocks_per_row * per_sub, sub, rows), np.int8)  # model.quant_blocks' layout
    scale = np.empty((blocks_per_row * per_sub, rows), np.float32)
    asymmetric = kind in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")
    offset = np.empty(scale.shape, np.float32) if asymmetric else None
    step = max(1, _CHUNK_WEIGHTS // (per_block * rows))  # blocks of every row decoded at a time
    starts = range(0, blocks_per_row, step)
    problems: list[tuple[int, int, str]] = []

    def work(chunk: Sequence[int]) -> None:
        for b0 in chunk:
            b1 = min(b0 + step, blocks_per_row)
            t = np.ascontiguousarray(raw[:, b0:b1].transpose(1, 2, 0))  # (blocks, bytes, rows)
            n = b1 - b0
            qs = q[b0 * per_sub:b1 * per_sub].reshape(n, per_sub, sub, rows).view(np.uint8)
            ss = scale[b0 * per_sub:b1 * per_sub].reshape(n, per_sub, rows)
            os = None if offset is None else offset[b0 * per_sub:b1 * per_sub].reshape(n, per_sub, rows)
            decode(t, qs, ss, os)
            found = _problem(kind, qs.view(np.int8), ss, os, low)
            if found is not None:
                block, row, what = found
                problems.append((row, b0 + block, what))

    n = max(1, min(num_threads(), len(starts)))
    run_parallel(work, [starts[i::n] for i in range(n)])
    if problems:
        row, block, what = min(problems)
        why = "no quantizer writes it, the file is damaged" if "code" in what else "the file is damaged"
        raise CheckpointError(f"tensor {name}: {what} (row {row}, block {block}): {why}")
    return BlockQuantTensor(q, scale, offset, kind)


def _problem(kind, q, s, o, low) -> tuple[int, int, str] | None:
    """The first (block, row, what is wrong) of a decoded chunk, None when it is sound."""
    for values, what in ((s, "scale"), (o, "offset")):
        if values is not None and not np.isfinite(values).all():
            block, row = np.argwhere(~np.isfinite(values).all(axis=1))[0]
            return int(block), int(row), f"a {kind} {what} is NaN or infinite"
    if low == -127:  # Q8_0: -128 is the one int8 no quantizer writes (other types' codes cannot leave their range)
        bad = (q == -128).any(axis=(1, 2))
        if bad.any():
            block, row = np.argwhere(bad)[0]
            return int(block), int(row), f"a {kind} code is outside -127..127"
    return None
