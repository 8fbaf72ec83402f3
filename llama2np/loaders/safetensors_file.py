"""Read a ``.safetensors`` file as memory-mapped NumPy arrays, bfloat16 included.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the byte after the header), then the raw little-endian
data. The ``safetensors`` package's NumPy backend refuses bfloat16, so the
header is parsed here and each tensor mapped straight from the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CheckpointError
from ..model.storage import BF16

DTYPES = {"BF16": BF16, "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
          "I8": np.dtype("i1")}  # int8: llama2np's own quantized checkpoints

#: a header bigger than this is corrupt, not a checkpoint (the format itself caps it at 100 MB)
_MAX_HEADER = 100_000_000


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset where the data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file: it is truncated")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: header length {n} is implausible: not a safetensors file, or corrupt")
        if 8 + n > size:
            raise CheckpointError(f"{path}: the header needs {n} bytes but the file ends after {size - 8}: "
                                  "the file is truncated")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry as the format defines it, or None."""
    if not isinstance(entry, dict):
        return f"expected a JSON object with dtype, shape and data_offsets, got {entry!r}"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        return f"no {', '.join(missing)} in {entry!r}"

    def counts(value) -> bool:  # JSON integers >= 0 (not true/false, not 2.0)
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value)

    if not isinstance(entry["dtype"], str):
        return f"dtype must be a string such as \"F32\", got {entry['dtype']!r}"
    if not counts(entry["shape"]):
        return f"shape must be a list of non-negative integers, got {entry['shape']!r}"
    if not (counts(entry["data_offsets"]) and len(entry["data_offsets"]) == 2):
        return f"data_offsets must be two non-negative integers [begin, end], got {entry['data_offsets']!r}"
    return None


def _mapper(path: Path, name: str, entry, data_start: int, data_size: int) -> Callable[[], np.ndarray]:
    """Check one header entry; return a function that memory-maps the tensor."""
    problem = _entry_problem(entry)
    if problem:
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {problem}")
    dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}, which llama2np cannot load "
                              f"(supported: {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} {dtype_name} needs {nbytes} "
                              f"bytes but its data_offsets are [{begin}, {end}]: the header is corrupt")
    if end > data_size:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                              f"{data_start + data_size} bytes: the file is truncated")

    def load() -> np.ndarray:
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)

    return load


def open_safetensors(path: str | Path) -> dict[str, Callable[[], np.ndarray]]:
    """Name -> function returning that tensor memory-mapped (dtype ``BF16`` for bfloat16).

    The header is checked up front: a truncated file or a tensor reaching past
    the end raises CheckpointError before anything is mapped. Each tensor gets
    its own map, so dropping the array releases its pages.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors file")
    header, data_start = read_header(path)
    data_size = path.stat().st_size - data_start
    return {name: _mapper(path, name, entry, data_start, data_size) for name, entry in header.items()}
