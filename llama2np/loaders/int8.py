"""llama2np's own int8 checkpoints, written by ``int8_writer.py`` (see there for the layout).

Every tensor is memory-mapped; each weight matrix comes back as a
``QuantizedTensor`` (int8 values + float32 row scales), which ``Int8Linear``
uses without quantizing again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.args import require_object
from ..model.linear import QuantizedTensor
from .common import LazyStateDict, make_args
from .safetensors_file import open_safetensors

FORMAT, CONFIG_FILE, WEIGHTS_FILE = "llama2np-int8", "llama2np.json", "model.int8.safetensors"


def is_int8_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def load_int8(directory: Path, max_seq_len: int | None = None):
    """(ModelArgs, state dict in Meta naming) of an int8 checkpoint directory."""
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not a readable llama2np int8 config ({e})") from None
    require_object(config, config_path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    params = config.get("params")
    require_object(params, config_path)
    args = make_args(params, config_path, max_seq_len)
    tensors = open_safetensors(directory / WEIGHTS_FILE)

    def maker(name: str):
        if name + ".scale" not in tensors:
            return tensors[name]

        def load() -> QuantizedTensor:
            q, scale = tensors[name](), tensors[name + ".scale"]()
            try:
                return QuantizedTensor(q.view(np.int8) if q.dtype == np.uint8 else q, scale)
            except ValueError as e:
                raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {name!r}: {e}") from None

        return load

    names = [n for n in tensors if not n.endswith(".scale")]
    return args, LazyStateDict({n: maker(n) for n in names}, directory / WEIGHTS_FILE)
