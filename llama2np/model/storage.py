"""Storage dtypes NumPy lacks, and the conversions to a compute dtype.

NumPy has no bfloat16. Loaders hand out bf16 tensors as arrays of the
structured dtype ``BF16`` (one little-endian uint16 field), usually a view of
a memory-mapped file: slicing, concatenating and reshaping work as for any
array, and ``to_float`` widens them when the numbers are needed. bf16 is the
top half of an IEEE float32, so widening is a 16-bit shift and exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BF16 = np.dtype([("bf16", "<u2")])

#: dtypes a checkpoint tensor may be stored in
STORAGE_DTYPES = (BF16, np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))

#: dtypes the forward pass may compute in
COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def is_bf16(a: np.ndarray) -> bool:
    return a.dtype == BF16


def bf16_to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen a BF16 array to float32 (exact). ``out`` lets a caller reuse a buffer."""
    bits = a.view(np.uint16)
    if out is None:
        out = np.empty(a.shape, dtype=np.float32)
    # Write the 16 bits into the high half of each float32 word (little-endian).
    out32 = out.view(np.uint32)
    np.left_shift(bits, 16, out=out32, dtype=np.uint32)
    return out


def float32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to BF16, to nearest with ties to even (as torch does)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16).view(BF16)


def to_float(a: np.ndarray, dtype: np.dtype | str = np.float32) -> np.ndarray:
    """Any stored tensor as a float array of ``dtype`` (no copy when it already is)."""
    dtype = np.dtype(dtype)
    if is_bf16(a):
        a = bf16_to_float32(a)
    return np.asarray(a, dtype=dtype)


def resolve_compute_dtype(dtype: str | np.dtype) -> np.dtype:
    """'float32' or 'float64' (or the NumPy dtype) as a NumPy dtype; anything else is an error."""
    from ..errors import InputError

    try:
        key = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        key = None
    if key not in COMPUTE_DTYPES:
        raise InputError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}")
    return COMPUTE_DTYPES[key]


# --- widening pairs -----------------------------------------------------------------------
# Two adjacent 16-bit values read as one uint32 p (little-endian): the even column is p's low half,
# the odd column its high half. Each function writes one column's float32 bits into ``out`` (uint32).

_SHIFT, _HIGH = np.uint32(16), np.uint32(0xFFFF0000)
_FP16_BITS, _FP16_SCALE = np.uint32(0x8FFFE000), np.float32(2.0 ** 112)


def bf16_pair_even(p: np.ndarray, out: np.ndarray) -> None:
    np.left_shift(p, _SHIFT, out=out)


def bf16_pair_odd(p: np.ndarray, out: np.ndarray) -> None:
    np.bitwise_and(p, _HIGH, out=out)


def fp16_pair_even(p: np.ndarray, out: np.ndarray) -> None:
    np.left_shift(p, _SHIFT, out=out)
    fp16_pair_odd(out, out)


def fp16_pair_odd(p: np.ndarray, out: np.ndarray) -> None:
    """The float16 in the high half of each uint32 as a float32, exactly (subnormals and zeros too).

    An arithmetic shift by 3 moves its exponent and mantissa to float32's places (the sign bit
    fills bits 31..28; the mask keeps bit 31); the result is the value times 2^-112 (float32's
    exponent bias 127 against float16's 15), undone by one multiply. Infinities and NaNs would come
    out finite, so float16 weights holding them are refused when the Linear is made. ~5 G values/s
    per core for both halves, against ~0.8 for NumPy's float16 cast.
    """
    np.right_shift(p.view(np.int32), 3, out=out.view(np.int32))
    np.bitwise_and(out, _FP16_BITS, out=out)
    f = out.view(np.float32)
    np.multiply(f, _FP16_SCALE, out=f)


def check_finite_fp16(parts: Sequence[np.ndarray], step: int = 1 << 18) -> None:
    """CheckpointError when a float16 weight holds inf or NaN (exponent bits all set); ``step`` values at a time.

    Parts of other dtypes are skipped; the error's ``part`` is the index of the bad one, so that a caller
    knowing the tensors' names can name it.
    """
    from ..errors import CheckpointError

    for k, w in enumerate(parts):
        if not isinstance(w, np.ndarray) or w.dtype != np.float16:
            continue
        bits = w.view(np.uint16).reshape(-1)
        for i in range(0, bits.size, step):
            if (bits[i : i + step] & 0x7FFF).max(initial=0) >= 0x7C00:
                error = CheckpointError(f"the float16 tensor of shape {w.shape} holds inf or NaN values: "
                                        "the checkpoint is damaged")
                error.part = k
                raise error
