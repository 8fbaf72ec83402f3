"""Pieces every checkpoint loader shares: lazy state dicts, progress, shape checks."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..config import MAX_SEQ_LEN, field_problem
from ..errors import CheckpointError, ConfigError, InputError
from ..model import ModelArgs
from ..tensors import STORAGE_DTYPES


class LazyStateDict(Mapping):
    """A state dict whose tensors are produced (merged, permuted) only when first read.

    Keeps peak memory near one tensor above the weights themselves: nothing is
    materialised for a tensor the model never asks for, and each is built once.
    ``specs`` tells a tensor's (shape, dtype) without building it, so a checkpoint
    can be validated before any shard is merged.
    """

    def __init__(self, makers: Mapping[str, Callable[[], np.ndarray]], source: Path | str,
                 specs: Mapping[str, Callable[[], tuple[tuple[int, ...], np.dtype]]] | None = None):
        self._makers, self._cache, self.source = dict(makers), {}, source
        self._specs = dict(specs or {})

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of a tensor, without building it when the loader can tell."""
        if name in self._specs and name not in self._cache:
            return self._specs[name]()
        t = self[name]
        return tuple(t.shape), t.dtype

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            try:
                maker = self._makers[name]
            except KeyError:
                raise CheckpointError(f"{self.source}: tensor {name!r} is missing from the checkpoint") from None
            self._cache[name] = maker()
        return self._cache[name]

    def __contains__(self, name: object) -> bool:
        return name in self._makers  # without building the tensor

    def release(self, name: str) -> None:
        """Forget the built tensor (it is built again if read again), so a consumer that converts
        tensors one by one (int8 quantisation) keeps memory near one tensor above its output."""
        self._cache.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def progress_bar(items: Iterable, desc: str, progress: bool | None) -> Iterable:
    """Wrap ``items`` in a tqdm bar when ``progress`` is True, or None and stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", file=sys.stderr)


def check_max_seq_len(max_seq_len) -> None:
    """The caller's ``max_seq_len`` (None: the model's own) must be a plausible context length."""
    if max_seq_len is None:
        return
    problem = field_problem("max_seq_len", max_seq_len, "positive int")
    if problem is None and max_seq_len > MAX_SEQ_LEN:
        problem = f"max_seq_len={max_seq_len} is absurd (the limit is {MAX_SEQ_LEN}; Llama 2 was trained on 4096)"
    if problem:
        raise InputError(problem)


def make_args(params: Mapping, source: Path | str, max_seq_len: int | None = None, **overrides) -> ModelArgs:
    """ModelArgs from a config dict, with errors that name the config file.

    ``max_seq_len`` (the caller's, checked by ``check_max_seq_len``) replaces the config's context
    length; past it, with a ContextLengthWarning, as the model never saw such positions.
    """
    try:
        args = ModelArgs.from_params(params, **overrides)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None
    if max_seq_len is None:
        return args
    if max_seq_len > args.max_seq_len:
        from ..generation import ContextLengthWarning

        warnings.warn(f"max_seq_len={max_seq_len} is past the {args.max_seq_len} positions the model at {source} "
                      "was trained on: expect worse text beyond them", ContextLengthWarning, stacklevel=4)
    return dataclasses.replace(args, max_seq_len=max_seq_len)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in Meta naming, with its shape."""
    d, kv, hidden = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,),
              "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (d, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, d),
            p + "feed_forward.w1.weight": (hidden, d), p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        })
    return shapes


def validate(args: ModelArgs, state: Mapping[str, np.ndarray], source: Path | str) -> None:
    """Check every needed tensor is present with the shape the config implies and a known dtype.

    Raises CheckpointError naming the checkpoint, the tensor and both shapes;
    a config that disagrees with the tensors shows up here as a shape mismatch.
    """
    missing = [n for n in expected_shapes(args) if n not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    for name, shape in expected_shapes(args).items():
        if isinstance(state, LazyStateDict):
            actual, dtype = state.spec(name)
        else:
            actual, dtype = tuple(state[name].shape), state[name].dtype
        if dtype not in STORAGE_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} has unsupported dtype {dtype} "
                                  "(expected bfloat16, float16, float32 or float64)")
        if tuple(actual) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(actual)}, but the config "
                                  f"(dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, "
                                  f"hidden={args.ffn_hidden_dim}, vocab={args.vocab_size}) implies {shape}")
