"""Write ``torch.save``-style ``.pth`` files and ``.safetensors`` files without torch, tensor by tensor.

Used by ``make_synthetic_checkpoint.py`` and by the tests (which run without
PyTorch installed). Both writers take the tensor list up front (name, shape,
dtype) and then ask ``produce(name)`` for each tensor's data, one chunk at a
time if it likes, so a 13 GB checkpoint is written in a few hundred MB of RAM.

The ``.pth`` file is a zip archive as torch writes it: ``<stem>/data.pkl``
(a protocol-2 pickle of an OrderedDict of ``torch._utils._rebuild_tensor_v2``
calls whose storages are persistent ids), one stored member per tensor
``<stem>/data/<k>`` aligned to 64 bytes, ``<stem>/byteorder`` and
``<stem>/version``. The pickle opcodes are written by hand because pickle's
own Pickler insists on importing ``torch`` to save a reference to it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

BF16 = np.dtype([("bf16", "<u2")])  # as llama2np.tensors.BF16: written as raw uint16 bits

_TORCH_STORAGE = {"bfloat16": "BFloat16Storage", "float16": "HalfStorage", "float32": "FloatStorage",
                  "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage"}
_SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
                      "int64": "I64", "int32": "I32"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4}


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16", "float16", "float32", ...

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


#: produce(spec) yields the tensor's bytes (arrays or bytes, C order) in as many chunks as it likes
Producer = Callable[[TensorSpec], Iterable[np.ndarray | bytes]]


def dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == BF16 else a.dtype.name


def specs_of(state: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), dtype_name(v)) for k, v in state.items()]


def _from_state(state: dict[str, np.ndarray]) -> Producer:
    return lambda spec: [np.ascontiguousarray(state[spec.name])]


# --- pickle opcodes (protocol 2) -------------------------------------------------------------

def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(n: int) -> bytes:
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def op_tuple(items: Iterable[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


PROTO, STOP, REDUCE, EMPTY_TUPLE, NEWFALSE, BINPERSID, MARK, SETITEMS = (
    b"\x80\x02", b".", b"R", b")", b"\x89", b"Q", b"(", b"u")


def _tensor_pickle(spec: TensorSpec, key: str) -> bytes:
    numel = int(np.prod(spec.shape, dtype=np.int64))
    stride, acc = [], 1
    for n in reversed(spec.shape):
        stride.insert(0, acc)
        acc *= n
    storage = op_tuple([op_str("storage"), op_global("torch", _TORCH_STORAGE[spec.dtype]), op_str(key),
                        op_str("cpu"), op_int(numel)]) + BINPERSID
    ordered_dict = op_global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    args = op_tuple([storage, op_int(0), op_tuple(map(op_int, spec.shape)), op_tuple(map(op_int, stride)),
                     NEWFALSE, ordered_dict])
    return op_global("torch._utils", "_rebuild_tensor_v2") + args + REDUCE


def state_dict_pickle(specs: Sequence[TensorSpec]) -> bytes:
    """The data.pkl of a state dict whose i-th tensor lives in storage ``str(i)``."""
    body = b"".join(op_str(s.name) + _tensor_pickle(s, str(i)) for i, s in enumerate(specs))
    return PROTO + op_global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + body + SETITEMS + STOP


# --- writers -------------------------------------------------------------------------------

def _stored_member(zf: zipfile.ZipFile, name: str, size: int, align: int = 64) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header, name, extra-field header
    info.extra = b"FB" + struct.pack("<H", -start % align) + b"Z" * (-start % align)
    return info


def write_pth(path: str | Path, specs: Sequence[TensorSpec], produce: Producer | None = None,
              state: dict[str, np.ndarray] | None = None, pickle_bytes: bytes | None = None) -> Path:
    """Write a torch zip checkpoint. Give ``state`` (a dict of arrays) or ``specs`` + ``produce``.

    ``pickle_bytes`` replaces the data.pkl (tests use it to craft hostile files).
    """
    path = Path(path)
    if state is not None:
        specs, produce = specs_of(state), _from_state(state)
    prefix = path.stem + "/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(prefix + "data.pkl", pickle_bytes if pickle_bytes is not None else state_dict_pickle(specs))
        zf.writestr(prefix + "byteorder", b"little")
        for i, spec in enumerate(specs):
            with zf.open(_stored_member(zf, f"{prefix}data/{i}", spec.nbytes), "w") as f:
                _write_tensor(f, spec, produce)
        zf.writestr(prefix + "version", b"3\n")
    return path


def write_safetensors(path: str | Path, specs: Sequence[TensorSpec], produce: Producer | None = None,
                      state: dict[str, np.ndarray] | None = None, metadata: dict | None = None) -> Path:
    """Write a .safetensors file (bfloat16 included), streaming each tensor's chunks to disk."""
    path = Path(path)
    if state is not None:
        specs, produce = specs_of(state), _from_state(state)
    header, offset = {}, 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPE[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for spec in specs:
            _write_tensor(f, spec, produce)
    return path


def _write_tensor(f, spec: TensorSpec, produce: Producer) -> None:
    written = 0
    for chunk in produce(spec):
        written += f.write(_bytes(chunk))
    if written != spec.nbytes:
        raise ValueError(f"{spec.name}: produced {written} bytes, its shape {spec.shape} {spec.dtype} needs "
                         f"{spec.nbytes}")


def _bytes(chunk: np.ndarray | bytes) -> bytes | memoryview:
    if isinstance(chunk, np.ndarray):
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data
    return chunk


def chunks(a: np.ndarray, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Row blocks of ``a`` of at most ~max_bytes each."""
    rows = max(1, max_bytes // max(1, a[:1].nbytes)) if a.ndim > 1 else a.shape[0]
    for r in range(0, max(a.shape[0], 1), rows):
        yield a[r:r + rows]
