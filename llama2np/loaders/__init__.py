"""Find out which checkpoint layout a path holds and load it in Meta's naming.

Every loader returns ``(ModelArgs, state_dict)`` where the state dict uses
Meta's tensor names and Meta's interleaved RoPE row order, so one model class
serves every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CheckpointError
from ..model import ModelArgs
from .common import validate
from .meta import is_meta_dir, load_meta


@dataclass
class Checkpoint:
    args: ModelArgs
    state: Mapping[str, np.ndarray]
    source: Path
    layout: str  # "meta", "hf" or "llama2c"
    tokenizer_candidates: list[Path] = field(default_factory=list)


def load_checkpoint(path: str | Path, max_seq_len: int | None = None, progress: bool | None = None) -> Checkpoint:
    """Detect the layout at ``path`` and load it (weights stay memory-mapped where possible)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_meta_dir(path):
        args, state = load_meta(path, max_seq_len=max_seq_len, progress=progress)
        ckpt = Checkpoint(args, state, path, "meta", [path / "tokenizer.model", path.parent / "tokenizer.model"])
    else:
        raise CheckpointError(
            f"{path}: no checkpoint layout recognised. Looked for: a Meta directory "
            "(params.json + consolidated.NN.pth)"
        )
    validate(ckpt.args, ckpt.state, ckpt.source)
    return ckpt
