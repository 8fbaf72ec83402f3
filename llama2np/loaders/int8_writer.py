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
- ``tokenizer.model``, copied when one is beside the source checkpoint.

``loaders.int8`` reads it back memory-mapped: the model it gives computes the
same logits as quantizing the source at load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..model.linear import quantize_int8
from ..model.storage import to_float
from . import load_checkpoint
from .common import progress_bar

FORMAT = "llama2np-int8"
CONFIG_FILE = "llama2np.json"
WEIGHTS_FILE = "model.int8.safetensors"


def is_matrix(name: str) -> bool:
    """Weights that ``Transformer`` multiplies with (quantized); the embedding is looked up, not multiplied."""
    return name == "output.weight" or (name.startswith("layers.") and name.endswith(".weight")
                                       and not name.endswith("norm.weight"))


def quantize_checkpoint(source: str | Path, out: str | Path, progress: bool | None = None) -> Path:
    """Quantize the checkpoint at ``source`` (any layout) to int8 and write it to directory ``out``."""
    from safetensors.numpy import save_file

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory; choose a new --out")
    ckpt = load_checkpoint(source, progress=progress)
    tensors: dict[str, np.ndarray] = {}
    for name in progress_bar(list(ckpt.state), "quantizing", progress):
        w = ckpt.state[name]
        if is_matrix(name):
            tensors[name], tensors[name + ".scale"] = quantize_int8(w)
        else:
            tensors[name] = np.ascontiguousarray(to_float(w, np.float32))
        if hasattr(ckpt.state, "release"):
            ckpt.state.release(name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {"format": FORMAT, "params": ckpt.args.to_params(), "source": str(ckpt.source)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = next((p for p in ckpt.tokenizer_candidates if p.is_file()), None)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out
