"""Meta's release layout: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

fairscale split each weight across shards: column-parallel ones (wq, wk, wv,
w1, w3, output) by output rows (dim 0), row-parallel ones (wo, w2) and the
parallel embedding by input columns (dim 1); norms and ``rope.freqs`` are
copied whole into every shard. Merging concatenates along those axes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..model.args import field_problem, require_object
from ..model.storage import is_bf16
from .common import LazyStateDict, make_args, progress_bar
from .torch_pickle import load_pth

#: the axis fairscale split each weight on (name after "layers.N."): 0 = output rows (column-parallel),
#: 1 = input columns (row-parallel); a weight not here (norms, rope.freqs) is whole in every shard.
#: Tensor parallelism (distributed/shard.py) cuts the same way.
SPLIT_AXIS = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1}
_LAYER_PREFIX = re.compile(r"layers\.\d+\.")
_REQUIRED = ("dim", "n_layers", "n_heads")


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def shard_paths(directory: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, checked to be complete."""
    found = {}
    for p in directory.glob("consolidated.*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise CheckpointError(f"{directory}: no consolidated.NN.pth shards")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise CheckpointError(f"{directory}: missing shard(s) {names} of {max(found) + 1}")
    return [found[i] for i in range(len(found))]


def split_axis(name: str) -> int | None:
    """The axis fairscale split ``name`` on across shards (SPLIT_AXIS); None when every shard holds it whole."""
    return SPLIT_AXIS.get(_LAYER_PREFIX.sub("", name, count=1))


def read_params(directory: Path) -> dict:
    path = directory / "params.json"
    try:
        params = require_object(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (Meta checkpoints ship params.json beside the shards)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in _REQUIRED if k not in params]
    if missing:  # the defaults are 7B's: silently taking them would blame the shards for a bad params.json
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)} (Meta's params.json always has "
                          f"{', '.join(_REQUIRED)})")
    if params.get("use_scaled_rope"):  # Llama 3.1's long-context RoPE: ignoring it would be silently wrong
        raise ConfigError(f"{path}: use_scaled_rope is not supported (Llama 2 uses plain RoPE)")
    return params


def load_meta(directory: Path, max_seq_len: int | None = None, progress: bool | None = None):
    """(ModelArgs, state dict in Meta naming) for a Meta checkpoint directory."""
    directory = Path(directory)
    params = read_params(directory)
    paths = shard_paths(directory)
    shards = [load_pth(p) for p in progress_bar(paths, "loading shards", progress)]
    names = list(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(names):
            diff = sorted(set(names) ^ set(shard))[:3]
            raise CheckpointError(f"{path}: holds different tensors than the first shard (e.g. {diff})")

    def shard_parts(name: str) -> list[np.ndarray]:
        # a part dropped after an earlier merge (see below) is mapped again from its file
        return [s[name] if name in s else load_pth(p)[name] for s, p in zip(shards, paths)]

    def merged_spec(name: str) -> tuple[tuple[int, ...], np.dtype]:
        parts, axis = shard_parts(name), split_axis(name)
        shape = list(parts[0].shape)
        if axis is not None and len(parts) > 1 and len(shape) > axis:
            shape[axis] = sum(p.shape[axis] for p in parts)
        return tuple(shape), parts[0].dtype

    def merge(name: str) -> np.ndarray:
        parts = shard_parts(name)
        axis = split_axis(name)
        if len(parts) == 1 or axis is None:
            return parts[0]
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"{directory}: shards store {name} in different dtypes "
                                  f"{[str(p.dtype) for p in parts]}")
        try:
            # bf16 as its uint16 bits: concatenating a structured dtype is many times slower
            merged = np.concatenate([p.view(np.uint16) if is_bf16(p) else p for p in parts], axis=axis)
            merged = merged.view(parts[0].dtype)
        except ValueError:
            shapes = [p.shape for p in parts]
            raise CheckpointError(f"{directory}: shards of {name} have shapes {shapes} that do not "
                                  f"concatenate on dim {axis}") from None
        for shard in shards:  # unmap the parts: their pages need not stay in RSS beside the merged copy
            shard.pop(name, None)
        return merged

    kept = [n for n in names if n != "rope.freqs"]
    state = LazyStateDict({n: (lambda n=n: merge(n)) for n in kept}, source=directory,
                          specs={n: (lambda n=n: merged_spec(n)) for n in kept})
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{directory}: no tok_embeddings.weight in the shards")
    vocab, columns = shards[0]["tok_embeddings.weight"].shape
    if problem := field_problem("vocab_size", params.get("vocab_size"), "int", optional=True):
        raise ConfigError(f"{directory / 'params.json'}: {problem}")
    if params.get("vocab_size", -1) not in (-1, None, vocab):
        raise ConfigError(f"{directory / 'params.json'}: vocab_size={params['vocab_size']!r} but "
                          f"tok_embeddings.weight has {vocab} rows")
    args = make_args(params, directory / "params.json", max_seq_len, vocab_size=vocab)  # checks every field
    if columns * len(shards) != args.dim:
        raise CheckpointError(f"{directory}: params.json has dim={args.dim} but {len(shards)} shard(s) of "
                              f"tok_embeddings.weight with {columns} columns each make {columns * len(shards)}: "
                              "a consolidated.NN.pth shard is missing (or params.json belongs to another model)")
    return args, state
