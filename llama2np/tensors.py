"""Storage dtypes NumPy lacks, and the conversions to a compute dtype.

NumPy has no bfloat16. Loaders hand out bf16 tensors as arrays of the
structured dtype ``BF16`` (one little-endian uint16 field), usually a view of
a memory-mapped file: slicing, concatenating and reshaping work as for any
array, and ``to_float`` widens them when the numbers are needed. bf16 is the
top half of an IEEE float32, so widening is a 16-bit shift and exact.
"""

from __future__ import annotations

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
    from .errors import InputError

    try:
        key = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        key = None
    if key not in COMPUTE_DTYPES:
        raise InputError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}")
    return COMPUTE_DTYPES[key]
