"""Quantize a checkpoint once: write an int8 checkpoint that loads memory-mapped.

    python -m llama2np quantize --model weights/llama-2-7b --out weights/llama-2-7b-int8

``--quantize int8`` quantizes every matrix at every load (7B: most of a minute, see
docs/performance.md). This
writes the result instead: a directory with

- ``model.int8.safetensors``: each weight matrix ``NAME`` (Meta naming) as
  int8 values ``NAME`` (out, in) plus float32 row scales ``NAME.scale`` (out,),
  W ~ q * scale[:, None] (``linear.quantize_int8``: symmetric per row); the
  embedding and the norm weights in float32 (bf16 and fp16 widen exactly);
- ``llama2np.json``: ``{"format": "llama2np-int8", "params": {...}}``, the
  model's hyper-parameters in Meta's ``params.json`` naming;
- ``tokenizer.model``, copied when one is beside the source checkpoint, else
  rebuilt from a GGUF's own vocabulary.

The directory is written under a temporary sibling name and renamed into
place at the end: after a failure or an interruption it is absent, never
half written.

``loaders.int8`` reads it back memory-mapped: the model it gives computes the
same logits as quantizing the source at load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..model.linear import QuantizedTensor, quantize_int8
from ..model.storage import to_float
from . import load_checkpoint
from .common import progress_bar
from .int8 import CONFIG_FILE, FORMAT, WEIGHTS_FILE, is_matrix


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """InputError, before any model is loaded, when ``out`` cannot become a new checkpoint directory."""
    try:
        os.fsencode(out)
    except UnicodeEncodeError as e:
        raise InputError(f"{flag} {out!r}: not a file name this system can hold ({e.reason})") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{flag} {out}: exists and is not an empty directory; choose a new {flag}")
    parent = out.parent
    while not parent.exists():  # the directories still to make; the first existing one must take them
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: no permission to write in {parent}")


def quantize_checkpoint(source: str | Path, out: str | Path, progress: bool | None = None) -> Path:
    """Quantize the checkpoint at ``source`` (any layout) to int8 and write it to directory ``out``.

    ``out`` is written as a temporary sibling directory and renamed at the end, so it is either
    complete or absent; a failed write is one InputError. An int8 source is copied as it is.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    out = Path(out).expanduser()
    check_out_dir(out)
    ckpt = load_checkpoint(source, progress=progress)
    tensors: dict[str, np.ndarray] = {}
    for name in progress_bar(list(ckpt.state), "quantizing", progress):
        w = ckpt.state[name]
        if isinstance(w, QuantizedTensor):  # an int8 checkpoint already: its values and scales as they are
            tensors[name], tensors[name + ".scale"] = np.ascontiguousarray(w.q), np.ascontiguousarray(w.scale)
        elif is_matrix(name):
            tensors[name], tensors[name + ".scale"] = quantize_int8(w)
        else:
            tensors[name] = np.ascontiguousarray(to_float(w, np.float32))
        if hasattr(ckpt.state, "release"):
            ckpt.state.release(name)
    tokenizer = next((p for p in ckpt.tokenizer_candidates if p.is_file()), None)
    embedded = ckpt.embedded_tokenizer() if tokenizer is None and ckpt.embedded_tokenizer is not None else None
    config = {"format": FORMAT, "params": ckpt.args.to_params(), "source": str(ckpt.source)}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        elif embedded is not None:  # a GGUF's own vocabulary, as a sentencepiece model
            (tmp / "tokenizer.model").write_bytes(embedded)
        os.replace(tmp, out)  # over an empty directory too
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise InputError(f"--out {out}: could not write the checkpoint ({getattr(e, 'strerror', None) or e}); "
                         "nothing was left behind") from None
    except BaseException:  # interrupted: leave nothing half written
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out
