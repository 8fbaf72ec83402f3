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


def is_matrix(name: str) -> bool:
    """Weights that ``Transformer`` multiplies with (quantized); the embedding is looked up, not multiplied."""
    return name == "output.weight" or (name.startswith("layers.") and name.endswith(".weight")
                                       and not name.endswith("norm.weight"))


def is_int8_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def load_int8(directory: Path, max_seq_len: int | None = None):
    """(ModelArgs, state dict in Meta naming) of an int8 checkpoint directory."""
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: not a readable llama2np int8 config ({e})") from None
    require_object(config, config_path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    params = config.get("params")
    require_object(params, config_path)
    args = make_args(params, config_path, max_seq_len)
    tensors = open_safetensors(directory / WEIGHTS_FILE)

    weights = directory / WEIGHTS_FILE

    def maker(name: str):
        if name + ".scale" not in tensors:
            return tensors[name]

        def load() -> QuantizedTensor:
            q, scale = tensors[name](), tensors[name + ".scale"]()
            problem = quantized_problem(name, q, scale)
            if problem:
                raise CheckpointError(f"{weights}: tensor {name!r}: {problem}")
            return QuantizedTensor(q, np.asarray(scale, dtype=np.float32))

        return load

    # NAME.scale belongs to NAME; one without its NAME is kept under its own name, so that it is reported unused
    names = [n for n in tensors if not (n.endswith(".scale") and n[: -len(".scale")] in tensors)]
    return args, LazyStateDict({n: maker(n) for n in names}, weights)


def quantized_problem(name: str, q: np.ndarray, scale: np.ndarray) -> str | None:
    """What is wrong with one quantized matrix: int8 values (out, in) and finite positive float scales (out,)."""
    if not is_matrix(name):
        return "has a .scale, but only weight matrices are quantized (the embedding and norms stay float)"
    if q.dtype != np.int8 or q.ndim != 2:
        return f"quantized values must be an int8 (out, in) matrix, got {q.dtype} {tuple(q.shape)}"
    if scale.dtype.kind != "f" or scale.shape != q.shape[:1]:
        return (f"its scales must be float ({q.shape[0]},) (one per row), got {scale.dtype} "
                f"{tuple(scale.shape)}")
    bad = np.flatnonzero(~np.isfinite(scale) | (scale < 0))
    if bad.size:
        return f"{bad.size} scale(s) are NaN, infinite or negative (the first at row {bad[0]}): the file is damaged"
    return None
