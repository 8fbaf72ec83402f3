"""Pieces every checkpoint loader shares: lazy state dicts, progress, shape checks."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from ..model.args import MAX_SEQ_LEN, ModelArgs, field_problem
from ..model.linear import QuantizedTensor
from ..model.quant_blocks import BLOCKS_DTYPE
from ..model.storage import STORAGE_DTYPES
from ..progress import bar


class LazyStateDict(Mapping):
    """A state dict whose tensors are produced (merged, permuted) only when first read.

    Keeps peak memory near one tensor above the weights themselves: nothing is
    materialised for a tensor the model never asks for, and each is built once.
    ``specs`` tells a tensor's (shape, dtype) without building it, so a checkpoint
    can be validated before any shard is merged.

    ``halves``: makers of the q/k projections as the file stores them when that is HF's
    rotate-halves row order (``self[name]`` reorders a copy into Meta's interleaved order);
    the model reads those through ``stored`` and reorders its q/k outputs instead, so no
    weight is copied.
    """

    def __init__(self, makers: Mapping[str, Callable[[], np.ndarray]], source: Path | str,
                 specs: Mapping[str, Callable[[], tuple[tuple[int, ...], np.dtype]]] | None = None,
                 halves: Mapping[str, Callable[[], np.ndarray]] | None = None):
        self._makers, self._cache, self.source = dict(makers), {}, source
        self._specs = dict(specs or {})
        self._halves = dict(halves or {})

    def in_halves_order(self, name: str) -> bool:
        """Whether ``stored(name)`` holds its rows in HF's rotate-halves order (per head: every real
        part, then every imaginary part) rather than Meta's interleaved pairs."""
        return name in self._halves

    def stored(self, name: str) -> np.ndarray:
        """The tensor as the checkpoint stores it, with no reordering copy (see ``in_halves_order``)."""
        if name not in self._halves:
            return self[name]
        key = ("stored", name)
        if key not in self._cache:
            self._cache[key] = self._halves[name]()
        return self._cache[key]

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
        self._cache.pop(("stored", name), None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def progress_bar(items: Iterable, desc: str, progress: bool | None) -> Iterable:
    """``items`` with a bar (see llama2np.progress: on a terminal or in a notebook by default)."""
    return bar(items, desc=desc, unit="file", progress=progress)


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
        from ..errors import ContextLengthWarning

        warnings.warn(f"max_seq_len={max_seq_len} is past the {args.max_seq_len} positions the model at {source} "
                      "was trained on: expect worse text beyond them", ContextLengthWarning, stacklevel=4)
    return dataclasses.replace(args, max_seq_len=max_seq_len)


_LAYER = re.compile(r"layers\.(\d+)\.")  # a per-layer tensor's name, in Meta naming


def _layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The tensors of one layer (names after ``layers.N.``) with their shapes."""
    d, kv, hidden = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return {"attention.wq.weight": (d, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, d), "feed_forward.w1.weight": (hidden, d),
            "feed_forward.w2.weight": (d, hidden), "feed_forward.w3.weight": (hidden, d),
            "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in Meta naming, with its shape."""
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
              "output.weight": (args.vocab_size, args.dim)}
    layer = _layer_shapes(args)
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def validate(args: ModelArgs, state: Mapping[str, np.ndarray], source: Path | str,
             config: Path | str = "the config") -> None:
    """Check the tensors are exactly those the config implies: each present, of its shape and a known dtype,
    and none left over.

    A missing or misshapen tensor raises CheckpointError naming the checkpoint, the tensor and both
    shapes; a tensor the config does not use raises ConfigError naming it (a config that says fewer
    layers than the checkpoint holds would otherwise run, silently wrong). Loaders drop beforehand
    the tensors a format legitimately carries unused (Meta's rope.freqs, HF's rotary inv_freq).
    ``config``: the file the arguments came from, for the messages.
    """
    held = {int(m.group(1)) for n in state if (m := _LAYER.match(n))}
    if args.n_layers > len(state):  # cannot all be there: say so before listing n_layers x 9 names
        raise CheckpointError(f"{source}: missing tensor(s) of layers {len(held)}..{args.n_layers - 1}; "
                              f"{config} says n_layers={args.n_layers} but the checkpoint holds {len(held)} layers")
    expected = expected_shapes(args)
    missing = [n for n in expected if n not in state]
    unused = [n for n in state if n not in expected]
    if missing or unused:
        per_layer = len(_layer_shapes(args))
        layers = (f"says n_layers={args.n_layers} but the checkpoint holds {len(held)} layers"
                  if held == set(range(len(held))) and len(held) != args.n_layers else "")
        if unused:
            raise ConfigError(f"{config}: leaves tensor(s) of {source} unused: {_summary(unused, per_layer)}; "
                              f"it {layers or 'does not describe this checkpoint'}")
        raise CheckpointError(f"{source}: missing tensor(s) {_summary(missing, per_layer)}"
                              + (f"; {config} {layers}" if layers else ""))
    for name, shape in expected.items():
        if isinstance(state, LazyStateDict):
            actual, dtype = state.spec(name)
        else:
            actual, dtype = tuple(state[name].shape), state[name].dtype
        if dtype not in STORAGE_DTYPES and dtype != BLOCKS_DTYPE and not isinstance(state[name], QuantizedTensor):
            raise CheckpointError(f"{source}: tensor {name} has unsupported dtype {dtype} "
                                  "(expected bfloat16, float16, float32 or float64)")
        if tuple(actual) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(actual)}, but the config "
                                  f"(dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, "
                                  f"hidden={args.ffn_hidden_dim}, vocab={args.vocab_size}) implies {shape}")


def _summary(names: list[str], per_layer: int, shown: int = 4) -> str:
    """The names, a whole layer's worth (``per_layer`` of them) as ``layers.N.*``, the first few and how many more."""
    by_layer: dict[int, int] = {}
    for n in names:
        if m := _LAYER.match(n):
            by_layer[int(m.group(1))] = by_layer.get(int(m.group(1)), 0) + 1
    whole = sorted(i for i, count in by_layer.items() if count >= per_layer)
    items = [f"layers.{i}.*" for i in whole]
    items += [n for n in names if not ((m := _LAYER.match(n)) and int(m.group(1)) in whole)]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more + f" ({len(names)} tensor{'s' if len(names) != 1 else ''})"
