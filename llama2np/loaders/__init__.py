"""Find out which checkpoint layout a path holds and load it in Meta's naming.

Every loader returns ``(ModelArgs, state_dict)`` where the state dict uses
Meta's tensor names and Meta's interleaved RoPE row order, so one model class
serves every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import CheckpointError
from ..model.args import ModelArgs
from .common import check_max_seq_len, validate
from .gguf import find_gguf_file, is_gguf_file, load_gguf, sentencepiece_model
from .hf import is_hf_dir, load_hf
from .int8 import is_int8_dir, load_int8
from .llama2c import find_llama2c_file, load_llama2c, looks_like_llama2c
from .llama2c import tokenizer_candidates as llama2c_tokenizer_candidates
from .meta import is_meta_dir, load_meta


@dataclass
class Checkpoint:
    args: ModelArgs
    state: Mapping[str, np.ndarray]
    source: Path
    layout: str  # "meta", "hf", "llama2c", "gguf" or "int8" (written by quantize)
    tokenizer_candidates: list[Path] = field(default_factory=list)
    #: a sentencepiece model serialized from the checkpoint itself (GGUF's vocabulary), used when no
    #: tokenizer file is found
    embedded_tokenizer: Callable[[], bytes] | None = None


def load_checkpoint(path: str | Path, max_seq_len: int | None = None, progress: bool | None = None) -> Checkpoint:
    """Detect the layout at ``path`` and load it (weights stay memory-mapped where possible)."""
    check_max_seq_len(max_seq_len)
    path = Path(path).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission ...
        raise CheckpointError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if path.is_file() and path.suffix == ".pth" and is_meta_dir(path.parent):
        path = path.parent  # a shard of a Meta directory: load the whole directory
    if path.is_file() and path.suffix in (".safetensors", ".bin", ".json") and is_hf_dir(path.parent):
        path = path.parent  # a weight file of an HF directory: load the whole directory
    llama2c = path if looks_like_llama2c(path) else (find_llama2c_file(path) if path.is_dir() else None)
    if is_int8_dir(path):
        args, state = load_int8(path, max_seq_len=max_seq_len)
        ckpt = Checkpoint(args, state, path, "int8", [path / "tokenizer.model"])
    elif is_meta_dir(path):
        args, state = load_meta(path, max_seq_len=max_seq_len, progress=progress)
        ckpt = Checkpoint(args, state, path, "meta", [path / "tokenizer.model", path.parent / "tokenizer.model"])
    elif is_hf_dir(path):
        args, state = load_hf(path, max_seq_len=max_seq_len, progress=progress)
        ckpt = Checkpoint(args, state, path, "hf", [path / "tokenizer.model", path.parent / "tokenizer.model"])
    elif (gguf_file := path if is_gguf_file(path) else find_gguf_file(path) if path.is_dir() else None):
        args, state, reader = load_gguf(gguf_file, max_seq_len=max_seq_len)
        ckpt = Checkpoint(args, state, gguf_file, "gguf", [gguf_file.parent / "tokenizer.model"],
                          embedded_tokenizer=lambda: sentencepiece_model(reader, gguf_file))
    elif llama2c is not None:
        args, state = load_llama2c(llama2c, max_seq_len=max_seq_len)
        ckpt = Checkpoint(args, state, llama2c, "llama2c", llama2c_tokenizer_candidates(llama2c))
    else:
        raise CheckpointError(
            f"{path}: no checkpoint layout recognised. Looked for: a Meta directory "
            "(params.json + consolidated.NN.pth); a Hugging Face directory (config.json + model.safetensors, "
            "model-0000K-of-0000N.safetensors + model.safetensors.index.json, or pytorch_model*.bin); "
            "a llama2.c checkpoint (a .bin file whose 7-int header matches its size, or a directory "
            "holding exactly one); a llama.cpp .gguf file (or a directory holding exactly one)"
        )
    config = {"meta": ckpt.source / "params.json", "hf": ckpt.source / "config.json"}.get(ckpt.layout, ckpt.source)
    validate(ckpt.args, ckpt.state, ckpt.source, config)
    return ckpt
