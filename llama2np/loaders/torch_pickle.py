"""Read a ``torch.save`` file (zip + pickle) into NumPy arrays, without torch.

A ``.pth`` is a zip archive: ``<name>/data.pkl`` pickles the state dict, and
each tensor's storage is a separate, uncompressed member ``<name>/data/<key>``.
The pickle names a few torch functions (``_rebuild_tensor_v2``, storage
classes); a restricted unpickler maps exactly those onto NumPy and refuses
every other global, so loading a file never runs code the file chose.
Storages are memory-mapped straight from the zip, so a 13 GB checkpoint costs
no memory until its weights are read.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.storage import BF16

# torch storage class -> dtype of its elements
_STORAGE_DTYPES = {
    "BFloat16Storage": BF16,
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    array, path, key = storage
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise CheckpointError(f"{path}: tensor in storage {key} has size {size} but stride {stride}")
    # Largest element index the view touches must lie inside the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if storage_offset < 0 or last >= array.size:
        raise CheckpointError(f"{path}: tensor of shape {size} reaches past the end of storage {key} "
                              f"({array.size} elements): the file is truncated or corrupt")
    itemsize = array.dtype.itemsize
    return np.ndarray(size, dtype=array.dtype, buffer=array, offset=storage_offset * itemsize,
                      strides=tuple(s * itemsize for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


# (module, name) a checkpoint may name -> what it becomes. Nothing else is ever resolved.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.path, self.zf, self.prefix = path, zf, prefix
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: refusing to load: the pickle asks for {module}.{name}, which is not on the "
                "allow-list of tensor-rebuilding functions (a checkpoint never needs it; it may be malicious)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            dtype = _STORAGE_DTYPES[storage_type.name]
            self.storages[key] = _map_member(self.path, self.zf, f"{self.prefix}data/{key}", dtype, numel)
        return self.storages[key], self.path, key


def _map_member(path: Path, zf: zipfile.ZipFile, member: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """Memory-map one uncompressed zip member as a 1-D array of ``numel`` elements."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise CheckpointError(f"{path}: storage {member!r} is missing from the archive") from None
    nbytes = numel * dtype.itemsize
    if info.file_size < nbytes:
        raise CheckpointError(f"{path}: storage {member!r} holds {info.file_size} bytes, "
                              f"{nbytes} expected: the file is truncated or corrupt")
    if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read it if someone did
        return np.frombuffer(zf.read(member), dtype=dtype, count=numel)
    # The data starts after the member's local header: 30 fixed bytes, then name and extra field.
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip header for {member!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + nbytes > path.stat().st_size:
        raise CheckpointError(f"{path}: storage {member!r} runs past the end of the file: the file is truncated")
    if numel == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(numel,))


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a ``torch.save`` zip file, tensors as (memory-mapped) NumPy arrays.

    bf16 tensors come back with dtype ``tensors.BF16``. Raises CheckpointError
    for a file that is not a zip checkpoint, is truncated, or pickles anything
    beyond tensors in (ordered) dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable torch zip checkpoint ({e}); legacy (pre-1.6, non-zip) "
                              "torch files and truncated files cannot be loaded") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        try:
            if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            with zf.open(pkl[0]) as f:
                state = _Unpickler(f, path, zf, prefix).load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle bytes, zip headers or CRCs, ...
            raise CheckpointError(f"{path}: cannot unpickle {pkl[0]}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict) in the checkpoint")
    return dict(state)
