"""Tensor-parallel slices of a Llama 2 layer (Megatron-style, as Meta's checkpoints are cut).

Of N processes, process k computes query heads [k·H/N, (k+1)·H/N), the key/value
heads those use, and a 1/N slice of the SwiGLU hidden units:

- column-parallel matrices (one output row per head dimension or hidden unit):
  its rows of wq, wk, wv, w1 and w3;
- row-parallel matrices: its columns of wo and w2, so its attention and FFN
  outputs are (tokens, dim) partial sums that add up, over the N processes, to
  the full layer's output.

When N exceeds n_kv_heads, each key/value head is replicated on the N / n_kv_heads
processes whose query heads use it. Nothing here needs Ray: ``actors.py``
places the slices on actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..checks import is_int
from ..errors import ConfigError, DistributedError
from ..loaders import load_checkpoint
from ..loaders.common import LazyStateDict
from ..loaders.meta import SPLIT_AXIS
from ..loaders.torch_pickle import load_pth
from ..model.args import ModelArgs
from ..model.linear import QuantizedTensor
from ..model.mapped import release_pages
from ..model.quant_blocks import BlockQuantTensor
from ..model.storage import BF16, is_bf16

#: the range of each layer matrix a process takes, along the axis Meta's shards split it on (SPLIT_AXIS)
_RANGE = {"attention.wq.weight": "heads", "attention.wk.weight": "kv_heads", "attention.wv.weight": "kv_heads",
          "attention.wo.weight": "heads", "feed_forward.w1.weight": "hidden", "feed_forward.w3.weight": "hidden",
          "feed_forward.w2.weight": "hidden"}


#: most actors a model may be split over: far beyond any cluster's machines, and a bound on every loop over ranks
MAX_WORLD = 4096


def check_world(world, error: type[Exception] = DistributedError) -> int:
    """tensor_parallel as an int (NumPy integers too, bools never), or ``error`` saying what it must be."""
    if not is_int(world) or not 1 <= world <= MAX_WORLD:
        raise error(f"tensor_parallel must be an integer in [1, {MAX_WORLD}], got {world!r}")
    return int(world)


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world`` tensor-parallel processes."""

    rank: int
    world: int

    def check(self, args: ModelArgs) -> None:
        """ConfigError unless ``world`` splits this model's heads, key/value heads and FFN evenly."""
        n, problems = self.world, []
        if args.n_heads % n:
            problems.append(f"n_heads={args.n_heads} is not divisible by it")
        if args.n_kv_heads % n and n % args.n_kv_heads:
            problems.append(f"it neither divides n_kv_heads={args.n_kv_heads} nor is a multiple of it")
        if args.ffn_hidden_dim < n:
            problems.append(f"the FFN hidden size {args.ffn_hidden_dim} is smaller")
        if problems:
            raise ConfigError(f"tensor_parallel={n} does not fit this model: " + "; ".join(problems))

    def heads(self, args: ModelArgs) -> range:
        """Query heads this process computes."""
        per = args.n_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, args: ModelArgs) -> range:
        """Key/value heads its query heads use (one, replicated, when world > n_kv_heads)."""
        if self.world <= args.n_kv_heads:
            per = args.n_kv_heads // self.world
            return range(self.rank * per, (self.rank + 1) * per)
        first = self.heads(args)[0] // args.n_rep
        return range(first, first + 1)

    def hidden(self, args: ModelArgs) -> range:
        """SwiGLU hidden units it computes (an even split where it divides, as Meta's; else sizes differ by 1)."""
        h, n, k = args.ffn_hidden_dim, self.world, self.rank
        return range(k * h // n, (k + 1) * h // n)

    def span(self, args: ModelArgs, what: str) -> tuple[int, int]:
        """(first, end) row or column of a weight for ``what`` in "heads", "kv_heads", "hidden"."""
        r = getattr(self, what)(args)
        unit = 1 if what == "hidden" else args.head_dim
        return r.start * unit, r.stop * unit

    def layer_shapes(self, args: ModelArgs) -> dict[str, tuple[int, int]]:
        """Shape of this process's slice of each layer matrix (name after "layers.N.")."""
        shapes = {}
        for name, what in _RANGE.items():
            a, b = self.span(args, what)
            shapes[name] = (args.dim, b - a) if SPLIT_AXIS[name] else (b - a, args.dim)
        return shapes


def _layer_key(name: str) -> str | None:
    """"attention.wq.weight" for "layers.3.attention.wq.weight"; None for non-layer or unsliced tensors."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _RANGE:
        return parts[2]
    return None


def shard_state(state: Mapping[str, np.ndarray], args: ModelArgs, shard: Shard) -> LazyStateDict:
    """The layer matrices of ``state`` cut to ``shard``'s rows and columns, each made on first read.

    Each slice is copied out (a contiguous array of the slice alone) and the whole
    tensor is then let go: its memory-mapped pages are released and a lazy state dict
    forgets it, so the process holds its slices, never the whole model.
    """
    shard.check(args)

    def cut(w: np.ndarray, a: int, b: int, columns: bool) -> np.ndarray:
        bits = w.view(np.uint16) if is_bf16(w) else w  # copying a structured dtype is slow
        part = np.ascontiguousarray(bits[:, a:b] if columns else bits[a:b]).view(w.dtype)
        release_pages(w)
        return part

    def take(name: str, key: str) -> np.ndarray | QuantizedTensor:
        full = state[name]
        columns = SPLIT_AXIS[key] == 1
        a, b = shard.span(args, _RANGE[key])
        if isinstance(full, BlockQuantTensor):  # a quantized GGUF's codes, scales and offsets, whole blocks
            part = full.cut(a, b, columns)
        elif isinstance(full, QuantizedTensor):  # int8 rows keep their scales; a column slice keeps them all
            part = QuantizedTensor(cut(full.q, a, b, columns), full.scale if columns else full.scale[a:b].copy())
        else:
            part = cut(full, a, b, columns)
        if hasattr(state, "release"):
            state.release(name)
        return part

    makers = {n: (lambda n=n, k=k: take(n, k)) for n in state if (k := _layer_key(n)) is not None}
    return LazyStateDict(makers, source=getattr(state, "source", "state dict"))


def meta_shards_are_slices(args: ModelArgs, n_shards: int, world: int) -> bool:
    """Whether Meta's ``consolidated.0k.pth`` shards are exactly the slices of ``world`` processes:
    as many shards, each holding whole key/value heads and an even share of the FFN (fairscale cut
    every split axis into equal parts; with fewer key/value heads than shards, a head was cut)."""
    return (n_shards == world and args.n_kv_heads % world == 0 and args.n_heads % world == 0
            and args.ffn_hidden_dim % world == 0)


def read_slice(source: str | Path, args: ModelArgs, shard: Shard, own_shard: bool) -> Mapping[str, np.ndarray]:
    """This process's slice of a checkpoint: Meta's ``consolidated.0k.pth`` when its shards are cut
    as ours (``own_shard``), else ``shard_state`` of the memory-mapped checkpoint."""
    if own_shard:
        return load_pth(Path(source) / f"consolidated.{shard.rank:02d}.pth")
    return shard_state(load_checkpoint(source, max_seq_len=args.max_seq_len).state, args, shard)


def storage_name(state) -> str:
    """bfloat16 / float16 / float32 / float64 / int8: how the layer weights are stored."""
    name = "layers.0.attention.wq.weight"
    dtype = state.spec(name)[1] if hasattr(state, "spec") else state[name].dtype
    return "bfloat16" if dtype == BF16 else np.dtype(dtype).name
