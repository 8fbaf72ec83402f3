"""Tensor parallelism on Ray: one actor per slice of every layer, the driver sums their outputs.

Megatron-style, as Meta's checkpoints are cut (see ``shard.py``): actor k holds
its query heads' rows of wq/wk/wv, the matching columns of wo, a 1/N slice of
the FFN (rows of w1/w3, columns of w2) and its own KV cache. The driver holds
the embedding, the norms and the output projection, so ``DistributedTransformer``
is a ``Transformer`` whose blocks' attention and feed-forward are remote:
generation, sampling, chat, perplexity and float64 run unchanged. Each layer
the driver sends the normalised input to every actor (through the object store,
once, when it is large), every actor returns its (batch, seq, dim) partial, and
the driver adds them: two reductions per layer.

Ray is imported here only, and only when a distributed model is built
(``pip install llama2np[distributed]``). Nothing is written anywhere, so an
actor or node that dies loses nothing: the driver raises ``DistributedError``
naming it, within ``timeout`` seconds, and a new model can be built. The model built on the
actors is in ``transformer.py``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import DistributedError, Llama2npError
from ..model.args import ModelArgs
from ..model.kv_cache import KVCache
from ..model.threads import blas_threads, set_num_threads
from ..model.transformer import RopeTable, build_layer, causal_mask, linear_maker
from .cluster import import_ray
from .compiled import compile_reduction, decode_request, encode_answer, run_compiled
from .memory_plan import check_node_memory, memory_plan
from .shard import Shard, read_slice

#: seconds a reduction (or a cache operation) may take before the actors are declared lost
DEFAULT_TIMEOUT = 120.0
#: seconds the actors may take to read (and quantise) their slices
LOAD_TIMEOUT = 3600.0
#: seconds placing the actors and starting their processes may take (a loaded machine starts Python slowly)
START_TIMEOUT = 60.0
#: reductions with inputs up to INLINE_BYTES go through one Ray Compiled Graph (compiled.py) when Ray
#: can compile it (environment LLAMA2NP_COMPILED_GRAPHS=1); else plain actor calls. Off by default:
#: Ray's channel readers busy-wait, so while a graph is up each idle actor keeps a core busy, between
#: generations too (measured in docs/performance.md)
COMPILED_GRAPHS = os.environ.get("LLAMA2NP_COMPILED_GRAPHS", "") == "1"
#: inputs up to this size go inside each actor call (a decode step's: faster than an object-store
#: reference every actor must fetch, see docs/performance.md); bigger ones through the object store, once
INLINE_BYTES = 64 * 1024


# --- the actor ------------------------------------------------------------------------------


class _Worker:
    """One tensor-parallel slice of every layer, run as a Ray actor (plain class: see ``_actor_class``)."""

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(),
                "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1}

    def load(self, spec: dict) -> None:
        """Read this actor's slice as ``spec`` says (see ``DistributedTransformer``); check the memory first."""
        args = ModelArgs(**spec["args"])
        shard, dtype = Shard(spec["rank"], spec["world"]), np.dtype(spec["dtype"])
        check_node_memory(memory_plan(args, shard.world, spec["storage"], spec["dtype"], spec["quantize"]),
                          spec["on_node"], f"actor {shard.rank} on node {self.where()['ip']}")
        set_num_threads(spec["threads"])
        part = read_slice(spec["source"], args, shard, spec["own_shard"])
        lin = linear_maker(part, dtype, spec["quantize"])
        self.blocks = [build_layer(args, part, i, lin) for i in range(args.n_layers)]
        self.args, self.dtype, self.kv_heads = args, dtype, len(shard.kv_heads(args))
        self.rope = RopeTable(args, dtype)
        self.caches: dict[int, KVCache] = {}

    def step(self, request: bytes) -> bytes:
        """The one node of the compiled graph (compiled.py): the reduction ``request`` names, its answer
        as bytes."""
        method, x, args = decode_request(request)
        return encode_answer(*getattr(self, method)(args[0], x, *args[1:]))

    def ping(self, i: int, x: np.ndarray):
        """A reduction's round trip without its work (benchmarks): x back, zero seconds."""
        return x, 0.0

    def weight_bytes(self) -> int:
        """Bytes of the weight matrices (and int8 scales) this actor holds."""
        mats = [m for a, f in self.blocks for m in (a.wqkv, a.wo, f.w13, f.w2)]
        return sum(w.nbytes for m in mats for w in m.parts) + sum(m.scale.nbytes for m in mats
                                                                    if hasattr(m, "scale"))

    def unload(self) -> None:
        """Drop the weights and caches (the actor waits for its next ``load``)."""
        self.blocks, self.caches = [], {}

    def _run(self, fn, x):
        t0 = time.perf_counter()
        with blas_threads(1):  # as in Transformer.forward: Linear spreads its products over our threads
            out = fn()
        return out, time.perf_counter() - t0

    def attention(self, i: int, x: np.ndarray, start_pos: int, cache_id: int | None):
        """(partial (batch, seq, dim) of layer i's attention, seconds)."""
        seqlen = x.shape[1]
        rotation = self.rope(start_pos, start_pos + seqlen)
        mask = causal_mask(seqlen, start_pos, self.dtype)
        cache = self.caches[cache_id] if cache_id is not None else None
        if cache is not None:
            cache.reserve(start_pos + seqlen)
        ck, cv = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
        return self._run(lambda: self.blocks[i][0](x, start_pos, rotation, mask, ck, cv), x)

    def feed_forward(self, i: int, x: np.ndarray):
        """(partial (batch, seq, dim) of layer i's feed-forward, seconds)."""
        return self._run(lambda: self.blocks[i][1](x), x)

    def new_cache(self, cache_id: int, batch_size: int, max_seq_len: int) -> None:
        self.caches[cache_id] = KVCache(self.args, batch_size, max_seq_len, self.dtype, self.kv_heads)

    def keep_rows(self, cache_id: int, keep: np.ndarray, upto: int) -> None:
        self.caches[cache_id] = self.caches[cache_id].keep_rows(keep, upto)

    def drop_cache(self, cache_id: int) -> None:
        self.caches.pop(cache_id, None)

    def peak_rss(self) -> int:
        """Peak resident memory of this actor's process, bytes (Linux: ru_maxrss is in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the driver's side ----------------------------------------------------------------------


class ActorGroup:
    """N ``_Worker`` actors in one placement group, and every call to them with a timeout."""

    def __init__(self, world: int, timeout: float = DEFAULT_TIMEOUT):
        ray = self.ray = import_ray()
        self.world, self.timeout, self.failure = world, timeout, None
        self.compiled = None  # the CompiledReduction, made at the first small reduction; False: plain calls
        self.round_trips: list[tuple[str, float, float]] | None = None  # (what, seconds, slowest actor's compute)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        spread = world > 1 and len(nodes) >= world  # one actor per machine; else packed
        cpus = ray.cluster_resources().get("CPU", 1.0)
        # A token CPU claim: the actors size their own thread pools to the cores of their node (see load),
        # and a model that asked for whole CPUs could not be placed beside another on a small cluster.
        per_actor = 0.01
        self.pg = placement_group([{"CPU": per_actor}] * world, strategy="STRICT_SPREAD" if spread else "PACK")
        self.actors = []
        start = max(self.timeout, START_TIMEOUT)
        try:
            ray.get(self.pg.ready(), timeout=start)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise DistributedError(f"could not place {world} actors ({per_actor} CPU each, "
                                   f"{'one per node' if spread else 'packed'}) on the Ray cluster within "
                                   f"{start:.0f} s: it has {cpus:g} CPUs on {len(nodes)} node(s)") from None
        self.actors = [_actor_class(ray).options(num_cpus=per_actor, max_restarts=0, scheduling_strategy=
                                      PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k))
                       .remote() for k in range(world)]
        self.where = [{"ip": "?", "node": "?"}] * world
        self.where = self.gather([a.where.remote() for a in self.actors], "start", timeout=start)

    def describe(self, rank: int) -> str:
        w = self.where[rank]
        return f"actor {rank} of {self.world} (pid {w.get('pid', '?')} on node {w['ip']} {w['node'][:8]})"

    def gather(self, refs: list, what: str, timeout: float | None = None) -> list:
        """Every actor's answer, in rank order; DistributedError (and the group shut down) when one
        died or did not answer within the timeout."""
        ray = self.ray
        if self.failure is not None:
            raise DistributedError(f"this model's actors were shut down after an earlier failure ({self.failure}); "
                                   "load the model again")
        timeout = self.timeout if timeout is None else timeout
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            late = [k for k, r in enumerate(refs) if r in pending]
            self.fail(f"{', '.join(self.describe(k) for k in late)} did not answer {what} within {timeout:g} s")
        out = []
        for k, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayTaskError as e:  # an exception inside the actor's method
                cause = getattr(e, "cause", None)
                if isinstance(cause, Llama2npError):
                    self.fail(str(cause), cause)
                self.fail(f"{self.describe(k)} failed in {what}: {cause!r}")
            except ray.exceptions.RayError as e:  # the actor (or its node) is gone
                self.fail(f"{self.describe(k)} died during {what} ({type(e).__name__})")
        return out

    def fail(self, message: str, error: Exception | None = None):
        self.failure = message
        self.close()
        if error is not None:
            raise error
        raise DistributedError(message)

    def call(self, method: str, *args, what: str | None = None, timeout: float | None = None) -> list:
        """Call ``method`` on every actor with the same arguments; their answers in rank order."""
        return self.gather([getattr(a, method).remote(*args) for a in self.actors], what or method, timeout)

    def reduce(self, method: str, x: np.ndarray, *args, what: str) -> np.ndarray:
        """Sum over actors of ``method(layer, x, *more)``'s partial outputs (args = layer, *more).

        A large x (prefill) is put in Ray's object store once, where every actor reads it; a small one
        (decode) travels inside each call (``INLINE_BYTES``).
        """
        t0 = time.perf_counter()
        if x.nbytes <= INLINE_BYTES and self._compile():
            answers = run_compiled(self, method, x, args, what)
        else:
            arg = x if x.nbytes <= INLINE_BYTES else self.ray.put(x)
            answers = self.gather([getattr(a, method).remote(args[0], arg, *args[1:]) for a in self.actors], what)
        total = answers[0][0].copy()  # actor outputs arrive read-only
        for part, _ in answers[1:]:
            total += part
        if self.round_trips is not None:
            self.round_trips.append((what, time.perf_counter() - t0, max(s for _, s in answers)))
        return total

    def _compile(self) -> bool:
        """Whether reductions go through the compiled graph (compiled once, on first use)."""
        if self.failure is None and self.compiled is None:
            self.compiled = (COMPILED_GRAPHS and compile_reduction(self.ray, self.actors, self.timeout)) or False
        return bool(self.compiled)

    def _end_compiled(self) -> None:
        if self.compiled:
            self.compiled.teardown()
        self.compiled = None

    @classmethod
    def acquire(cls, world: int, timeout: float) -> "ActorGroup":
        """An idle group of ``world`` actors left by a closed model of this process, else a new one."""
        ray = import_ray()
        job = ray.get_runtime_context().get_job_id()
        while _IDLE.get((world, job)):
            group = _IDLE[(world, job)].pop()
            group.timeout = timeout
            try:
                group.where = group.call("where", what="reuse", timeout=min(timeout, 10.0))
                return group
            except DistributedError:  # died while idle: it is shut down; try the next
                continue
        return cls(world, timeout)

    def release(self) -> None:
        """End this group's use; healthy actors drop their weights and wait, idle, for ``acquire``."""
        self._end_compiled()  # an idle group's graph would keep its actors' loops running
        if self.failure is None and self.actors:
            idle = object.__new__(ActorGroup)
            idle.__dict__.update(self.__dict__, round_trips=None)
            for a in idle.actors:
                a.unload.remote()
            _IDLE.setdefault((self.world, self.ray.get_runtime_context().get_job_id()), []).append(idle)
        self.actors, self.pg = [], None
        self.failure = self.failure or "the model was closed"

    def close(self) -> None:
        """Kill the actors and free the placement group (idempotent)."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already dead, or Ray is shutting down
                pass
        self._end_compiled()  # after the kills: a stalled actor cannot hold up the teardown
        self.actors = []
        if self.pg is not None:
            try:
                self.ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


_ACTOR_CLASS = None
_IDLE: dict[tuple[int, str], list[ActorGroup]] = {}  # (world, Ray job) -> groups of closed models


def _actor_class(ray):
    """``_Worker`` as a Ray actor class (made once: Ray exports a class definition per ``ray.remote``)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(_Worker)
    return _ACTOR_CLASS
