"""The model on the actors: a ``Transformer`` whose layers' attention and feed-forward are reductions
over an ``ActorGroup`` (``actors.py``), with a KV cache that lives on the actors."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import DistributedError
from ..loaders import Checkpoint, load_checkpoint
from ..loaders.meta import shard_paths
from ..model.transformer import Transformer, check_quantize
from .actors import DEFAULT_TIMEOUT, LOAD_TIMEOUT, ActorGroup
from .cluster import join_cluster
from .shard import Shard, check_world, meta_shards_are_slices, storage_name


class _RemoteAttention:
    """Layer i's attention, computed by the actors: the sum of their heads' partial outputs."""

    def __init__(self, group: ActorGroup, i: int):
        self.group, self.i = group, i

    def __call__(self, x, start_pos, rotation, mask, cache_k=None, cache_v=None):
        # the actors make their own rotation and mask; cache_k is the DistributedCache's id
        return self.group.reduce("attention", x, self.i, start_pos, cache_k, what=f"layer {self.i} attention")


class _RemoteFeedForward:
    def __init__(self, group: ActorGroup, i: int):
        self.group, self.i = group, i

    def __call__(self, x):
        return self.group.reduce("feed_forward", x, self.i, what=f"layer {self.i} feed-forward")


class DistributedCache:
    """A KV cache whose arrays live on the actors (each holds its key/value heads).

    ``k[i]`` and ``v[i]`` are this cache's id, which the actors look their arrays up by.
    """

    _ids = itertools.count()

    def __init__(self, group: ActorGroup, n_layers: int, batch_size: int, max_seq_len: int):
        self.group, self.id = group, next(self._ids)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        group.call("new_cache", self.id, batch_size, max_seq_len, what="new KV cache")
        self.k = self.v = [self.id] * n_layers

    def reserve(self, end: int) -> None:
        """Nothing to do here: each actor's cache grows as its attention reaches further."""

    def keep_rows(self, keep: np.ndarray, upto: int) -> "DistributedCache":
        """Keep only the batch rows where ``keep`` is True (in place, on every actor); returns self."""
        self.group.call("keep_rows", self.id, np.asarray(keep), upto, what="KV cache resize")
        self.batch_size = int(np.count_nonzero(keep))
        return self

    def __del__(self):
        if getattr(self.group, "actors", None):
            try:
                for a in self.group.actors:
                    a.drop_cache.remote(self.id)
            except Exception:  # Ray already shut down
                pass


class DistributedTransformer(Transformer):
    """A ``Transformer`` whose layers run tensor-parallel on ``world`` Ray actors.

    Same ``forward(tokens, start_pos, cache)`` and ``new_cache`` as ``Transformer``,
    so everything built on it works unchanged. Call ``close()`` (or drop it) to end the actors.
    """

    rows_at_own_positions = False  # the actors run one start position per forward

    def __init__(self, ckpt: Checkpoint, world: int, dtype: str | np.dtype = "float32",
                 quantize: str | None = None, ray_address: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        world = check_world(world)
        args, state, dtype = ckpt.args, ckpt.state, np.dtype(dtype)
        Shard(0, world).check(args)
        check_quantize(quantize)
        join_cluster(ray_address, timeout)
        self.group = group = ActorGroup.acquire(world, timeout)
        on_node = Counter(w["node"] for w in group.where)  # actors per node
        storage, actor_quantize = storage_name(state), quantize
        if storage == "int8":  # a llama2np int8 checkpoint: the actors keep its int8 slices as they are
            storage, actor_quantize = "float32", "int8"
        own = ckpt.layout == "meta" and meta_shards_are_slices(args, len(shard_paths(Path(ckpt.source))), world)
        specs = [{"args": args.to_params(), "rank": k, "world": world, "dtype": dtype.name,
                  "quantize": actor_quantize, "storage": storage, "source": str(ckpt.source), "own_shard": own,
                  "on_node": on_node[w["node"]], "threads": max(1, w["cpus"] // on_node[w["node"]])}
                 for k, w in enumerate(group.where)]
        group.gather([a.load.remote(s) for a, s in zip(group.actors, specs)], "load",
                     timeout=max(timeout, LOAD_TIMEOUT))
        # the driver builds the embedding, norms and output itself; the layers' matrices stay on the actors
        super().__init__(args, state, dtype, quantize,
                         make_layer=lambda i: (_RemoteAttention(group, i), _RemoteFeedForward(group, i)))

    def linears(self):
        return [self.output]  # the layers' matrices are on the actors

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> DistributedCache:
        return DistributedCache(self.group, self.args.n_layers, batch_size, max_seq_len or self.args.max_seq_len)

    def close(self) -> None:
        """Free the actors: they drop this model's weights and wait for the next distributed model of
        the same size in this process (``ray.shutdown()`` or the end of the process ends them).
        This model cannot be used afterwards."""
        self.group.release()

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.close()


def load_distributed(path, world: int, dtype: np.dtype, quantize: str | None, max_seq_len: int | None,
                     progress: bool | None, ray_address: str | None, timeout: float = DEFAULT_TIMEOUT):
    """(Checkpoint, DistributedTransformer): the driver maps the checkpoint but reads only the
    embedding, norms and output; the actors read their slices."""
    world = check_world(world)
    join_cluster(ray_address, timeout)  # an unreachable cluster is said now, not after the checkpoint is read
    ckpt = load_checkpoint(path, max_seq_len=max_seq_len, progress=progress)
    if ckpt.layout not in ("meta", "hf", "int8"):
        raise DistributedError(f"{ckpt.source}: tensor parallelism takes Meta, Hugging Face or llama2np int8 "
                               f"checkpoints, not {ckpt.layout}")
    return ckpt, DistributedTransformer(ckpt, world, dtype, quantize, ray_address, timeout)
