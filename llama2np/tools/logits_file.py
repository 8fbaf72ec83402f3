"""Reference logits for many prompts, written as one ``.npz`` without holding them all in memory.

Prompts come from a JSON-lines file, one per line: a JSON string (text,
tokenized with BOS), ``{"text": "..."}``, ``{"ids": [1, 450, ...]}`` or a bare
list of ids. The ``.npz`` holds, for P prompts of N tokens in all:

    ids       (N,)         int64    every prompt's ids, one after another
    offsets   (P + 1,)     int64    prompt p is rows offsets[p]:offsets[p + 1]
    logits    (N, vocab)   float32 or float64 (the compute dtype)
    logprobs  (N, vocab)   same     log_softmax(logits): row t, the log-probabilities of the token after ids[t]

Each prompt runs as one forward pass from position 0 and its rows are
appended to temporary ``.npy`` files as they come; at the end those are copied
into the zip member by member, so memory holds one prompt's logits at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from ..errors import InputError, TokenizerError
from ..generation.sampling import log_softmax
from ..progress import bar


def read_prompts(path: str | Path, encode: Callable[[str], list[int]],
                 check: Callable[[list[int]], np.ndarray]) -> list[np.ndarray]:
    """Token ids of every prompt in a JSON-lines file (blank lines skipped), each passed through ``check``
    (e.g. ``Llama2.check_ids``: vocabulary, context length); errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read prompts ({e})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{where}: nested too deeply to be a prompt") from None
        if isinstance(item, dict):
            if set(item) not in ({"text"}, {"ids"}):
                raise InputError(f'{where}: expected {{"text": ...}} or {{"ids": [...]}}, got keys {sorted(item)}')
            item = item.get("text", item.get("ids"))
        if isinstance(item, str):
            try:
                ids = encode(item)
            except TokenizerError as e:
                raise InputError(f"{where}: a text prompt needs a tokenizer ({e})") from None
            except InputError as e:  # e.g. a lone surrogate written as a JSON escape
                raise InputError(f"{where}: {e}") from None
        elif isinstance(item, list) and item and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
            ids = item
        else:
            raise InputError(f"{where}: a prompt is a text or a non-empty list of token ids, got {line[:60]!r}")
        try:
            prompts.append(check(ids))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    if not prompts:
        raise InputError(f"{path}: no prompts (one JSON text or id list per line)")
    return prompts


class NpyWriter:
    """An ``.npy`` file of known shape whose rows are appended as they are computed."""

    def __init__(self, f: BinaryIO, shape: tuple[int, ...], dtype: np.dtype):
        self.f, self.shape, self.dtype = f, shape, np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        self.rows = 0
        f.flush()

    def append(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, dtype=self.dtype).data)
        self.f.flush()  # to the OS now: nothing of this prompt stays in our memory
        self.rows += len(rows)


def write_logits_npz(model, prompts: Sequence[Sequence[int]], out: BinaryIO, progress: bool | None = None) -> int:
    """Run ``model`` (a ``Llama2``) on every prompt (checked ids, see ``read_prompts``) and write the ``.npz``
    to ``out``; returns the rows written."""
    ids = [np.asarray(p, dtype=np.int64) for p in prompts]
    lengths = np.array([len(p) for p in ids], dtype=np.int64)
    total, vocab, dtype = int(lengths.sum()), model.args.vocab_size, model.model.dtype
    with tempfile.TemporaryDirectory(prefix="llama2np-logits-") as tmp:
        files = {name: open(Path(tmp) / f"{name}.npy", "w+b") for name in ("ids", "offsets", "logits", "logprobs")}
        try:
            NpyWriter(files["ids"], (total,), np.int64).append(np.concatenate(ids))
            NpyWriter(files["offsets"], (len(ids) + 1,), np.int64).append(np.concatenate([[0], np.cumsum(lengths)]))
            logits_out = NpyWriter(files["logits"], (total, vocab), dtype)
            logprobs_out = NpyWriter(files["logprobs"], (total, vocab), dtype)
            for p in bar(ids, desc="logits", unit="prompt", progress=progress):
                logits = model.logits(p)  # (len(p), vocab)
                logits_out.append(logits)
                logprobs_out.append(log_softmax(logits))
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, f in files.items():
                    f.seek(0)
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        shutil.copyfileobj(f, member, 16 << 20)
        finally:
            for f in files.values():
                f.close()
    return total
