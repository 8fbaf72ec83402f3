"""A bounded walk over a GGUF file's header, before ``gguf.GGUFReader`` reads it.

The reader trusts every count in the file: an array claiming 2^62 elements is
looped over (and allocated) element by element, a tensor's data may start
anywhere. This walk reads the same layout (GGUF v2/v3, either byte order) and
checks, before anything is allocated:

* every count (key/value pairs, tensors, array elements, string bytes,
  dimensions) against the bytes the file still has: an element takes at least
  one byte, a string eight, so a count beyond that cannot be true;
* array nesting no deeper than ``MAX_DEPTH``;
* each tensor's data range: inside the file, after the header, and not
  overlapping another tensor's (overlapping data would load without complaint
  and give wrong logits).

Layout: magic "GGUF", version u32, tensor count u64, key/value count u64;
each pair: key (string: u64 length + bytes), value type u32, value; an array
is item type u32, count u64, items. Each tensor info: name, n_dims u32, dims
u64 x n_dims, ggml type u32, data offset u64 (from the aligned data start).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import CheckpointError

#: fixed-size value types: GGUF type number -> struct code
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
#: deepest array of arrays accepted (llama.cpp writes none; a deeper one is corrupt, not a model)
MAX_DEPTH = 4
#: ggml tensors have at most 4 dimensions (GGML_MAX_DIMS)
MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32


class _Walker:
    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0
        self.size = len(buf)

    def fail(self, what: str) -> None:
        raise CheckpointError(f"{self.path}: {what} at byte {self.pos} of {self.size}: "
                              "the file is truncated or corrupt")

    def take(self, code: str):
        n = struct.calcsize(code)
        if self.pos + n > self.size:
            self.fail(f"the header ends inside a {n}-byte value")
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of things taking at least ``min_bytes`` each, bounded by the bytes left."""
        n = self.take("Q")
        left = self.size - self.pos
        if n * min_bytes > left:
            self.pos -= 8
            self.fail(f"{what} count {n} needs at least {n * min_bytes} bytes, the file has {left} left")
        return n

    def string(self, what: str) -> bytes:
        n = self.count(f"{what} length", 1)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def value(self, kind: int, key: str, depth: int = 0):
        """Skip (or, for scalars, return) one value of GGUF type ``kind``."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(f"string of {key}")
        if kind != _ARRAY:
            self.pos -= 4
            self.fail(f"metadata key {key!r} has unknown value type {kind}")
        if depth >= MAX_DEPTH:
            self.fail(f"metadata key {key!r} nests arrays deeper than {MAX_DEPTH}")
        item = self.take("I")
        if item in _SCALARS:
            itemsize = struct.calcsize(_SCALARS[item])
            n = self.count(f"array {key!r}", itemsize)
            self.pos += n * itemsize
        elif item in (_STRING, _ARRAY):
            for _ in range(self.count(f"array {key!r}", 8 if item == _STRING else 12)):
                self.value(item, key, depth + 1)
        else:
            self.pos -= 4
            self.fail(f"metadata key {key!r} is an array of unknown type {item}")
        return None


def check_gguf_header(path: Path) -> None:
    """CheckpointError naming ``path`` when a count or a tensor's data range in its header cannot be true."""
    import gguf

    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too short for a GGUF file: "
                                  "it is truncated")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise CheckpointError(f"{path}: does not start with GGUF's magic bytes: not a GGUF file")
            order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
            w = _Walker(path, buf, order)
            w.pos = 4
            version = w.take("I")
            if version not in (2, 3):
                raise CheckpointError(f"{path}: GGUF version {version}; llama2np reads versions 2 and 3")
            n_tensors = w.take("Q")
            n_kv = w.take("Q")
            left = w.size - w.pos
            if n_kv * 13 > left or n_tensors * 24 > left:  # a pair takes >= 13 bytes, a tensor info >= 24
                w.fail(f"the header claims {n_kv} metadata keys and {n_tensors} tensors, more than "
                       f"{left} bytes can hold")
            alignment = _DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = w.string("key").decode("utf-8", "replace")
                value = w.value(w.take("I"), key)
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            infos = []
            for _ in range(n_tensors):
                name = w.string("tensor name").decode("utf-8", "replace")
                n_dims = w.take("I")
                if n_dims > MAX_DIMS:
                    w.fail(f"tensor {name!r} claims {n_dims} dimensions (ggml has at most {MAX_DIMS})")
                dims = [w.take("Q") for _ in range(n_dims)]
                kind, offset = w.take("I"), w.take("Q")
                infos.append((name, dims, kind, offset))
            start = -(-w.pos // alignment) * alignment
    _check_ranges(path, gguf, infos, start, w.size)


def _check_ranges(path: Path, gguf, infos: list, start: int, size: int) -> None:
    """Each tensor's bytes inside the data section, none overlapping another's."""
    spans = []
    for name, dims, kind, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {kind}") from None
        elements = 1
        for d in dims:
            elements *= d
        if dims and elements % block:
            raise CheckpointError(f"{path}: tensor {name!r} of dims {dims} does not fill whole "
                                  f"{block}-element blocks of its type")
        nbytes = elements * type_size // block
        begin = start + offset
        if begin + nbytes > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({nbytes} bytes at byte {begin}) runs past the end "
                                  f"of the file ({size} bytes): the file is truncated or corrupt")
        spans.append((begin, begin + nbytes, name))
    spans.sort()
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0:
            raise CheckpointError(f"{path}: the data of tensors {a!r} (bytes {a0}..{a1}) and {b!r} "
                                  f"(bytes {b0}..{b1}) overlap: the file is corrupt")
