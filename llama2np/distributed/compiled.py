"""A decode reduction through a Ray Compiled Graph: one graph over all actors, compiled once.

A plain actor call goes through Ray's task machinery each time (scheduling, an object
per answer: about 1 ms per actor per reduction). A compiled graph sets up shared-memory
channels between the driver and each actor once; each reduction then writes the
request into them and reads the answers back (see docs/performance.md for both round
trips measured). Every reduction of a forward pass uses the same graph: its one node per
actor is ``_Worker.step(request)``, which calls the method the request names.

Requests and answers cross the channels as raw ``bytes`` (a fixed header of int64s, then the
array's values): Ray writes bytes into a channel as they are and hands the reader its own copy,
where anything else goes through msgpack and pickle5 on both sides (which cost more than the
channels themselves, see docs/performance.md) and comes back as a numpy view of the channel's
shared memory. Such a view must not outlive the graph: released after ``ray.shutdown()`` (say,
held by an exception's traceback until the interpreter's last garbage collection) it crashes the
process at exit. With bytes, nothing the driver keeps points into a channel.

Ray runs compiled-graph tasks on a background thread of each actor, so the plain calls
(``new_cache``, ``keep_rows``, ...) still reach the actor's main thread; the driver makes
one call at a time, so the two never run at once.

A failure says which actor: when the graph's answers time out or the graph breaks (a dead
actor or node), each actor is asked a plain question and the silent or dead one is named.
The graph is torn down with its actors. Where compiled graphs are unavailable (an older
Ray, or compiling fails), ``compile_reduction`` returns None and plain calls are used.
"""

from __future__ import annotations

import struct
import time

import numpy as np

from ..errors import Llama2npError

#: answers larger than this would grow the channels' buffers; a decode step's partial sums are far
#: smaller (70B: 32 KiB), prefill goes through plain calls and the object store
BUFFER_BYTES = 1 << 20  # (they grow if ever needed)
#: seconds a live actor takes at most to answer a plain question while its graph thread computes
PROBE_SECONDS = 2.0
#: the driver sleeps before reading answers that took longer than SLEEP_AFTER seconds last time, for
#: SLEEP_SHARE of that time (the rest, and any answer faster than a sleep's own cost, it busy-waits for)
SLEEP_AFTER, SLEEP_SHARE = 0.5e-3, 0.8
#: the methods a request may name, and the dtypes its array may have (their index goes in the header)
METHODS = ("attention", "feed_forward", "ping")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: a request's header: method, dtype, the array's (batch, seq, dim), how many int arguments, up to 3
#: of them (layer, start position, cache id; None is -1: ids count from 0); 72 bytes keep the values
#: that follow 8-byte aligned
HEADER = struct.Struct("<9q")
#: an answer's header: the seconds the actor computed
SECONDS = struct.Struct("<d")


def encode_request(method: str, x: np.ndarray, args: tuple) -> bytes:
    """``method(args[0], x, *args[1:])`` as the bytes a graph's actors decode (``decode_request``)."""
    ints = [-1 if a is None else int(a) for a in args]
    head = HEADER.pack(METHODS.index(method), DTYPES.index(x.dtype), *x.shape, len(ints),
                       *ints, *[-1] * (3 - len(ints)))
    return b"".join((head, np.ascontiguousarray(x).data))


def decode_request(request: bytes) -> tuple[str, np.ndarray, list]:
    """(method, x (batch, seq, dim), int arguments) of ``encode_request``'s bytes; x is read-only."""
    method, dtype, batch, seq, dim, n, *ints = HEADER.unpack_from(request)
    x = np.frombuffer(request, DTYPES[dtype], count=batch * seq * dim, offset=HEADER.size)
    return METHODS[method], x.reshape(batch, seq, dim), [None if a == -1 else a for a in ints[:n]]


def encode_answer(out: np.ndarray, seconds: float) -> bytes:
    return b"".join((SECONDS.pack(seconds), np.ascontiguousarray(out).data))


def decode_answer(answer: bytes, like: np.ndarray) -> tuple[np.ndarray, float]:
    """(partial output shaped and typed as ``like``, read-only; the actor's seconds)."""
    part = np.frombuffer(answer, like.dtype, count=like.size, offset=SECONDS.size)
    return part.reshape(like.shape), SECONDS.unpack_from(answer)[0]


def _channels_without_torch(worker) -> None:
    """Run on each actor before its graph starts (``__ray_call__``): Ray's channel code imports torch,
    when it is installed, at a graph's first execution only to look for accelerators: 2 s and about
    180 MiB per actor; these channels carry numpy bytes only (a no-op where Ray lacks the attribute)."""
    from ray.experimental.channel.common import ChannelContext

    context = ChannelContext.get_current()
    if getattr(context, "_torch_available", False) is None:
        context._torch_available = False


class CompiledReduction:
    """One compiled graph: the driver's request to every actor, every actor's answer back."""

    def __init__(self, ray, actors: list, timeout: float):
        from ray.dag import InputNode, MultiOutputNode

        self.ray = ray
        ray.get([a.__ray_call__.remote(_channels_without_torch) for a in actors], timeout=timeout)
        with InputNode() as request:
            dag = MultiOutputNode([a.step.bind(request) for a in actors])
        self.graph = dag.experimental_compile(_buffer_size_bytes=BUFFER_BYTES)
        self.computed: dict[str, float] = {}  # method -> the slowest actor's seconds in its last reduction

    def wait(self, method: str) -> None:
        """Sleep through most of the time the slowest actor took for ``method`` last time: Ray's reader
        busy-waits for the answers, and on a machine the actors share that would take a core from them."""
        if self.computed.get(method, 0.0) > SLEEP_AFTER:
            time.sleep(self.computed[method] * SLEEP_SHARE)

    def execute(self, request: bytes) -> list:
        """One reference per actor, in rank order, to its answer to ``request`` (``ref.get(timeout)``
        raises Ray's exceptions: RayChannelTimeoutError, RayTaskError for an exception in the actor's
        method, ActorDiedError / RayChannelError when an actor or the graph is gone)."""
        return self.graph.execute(request)

    def teardown(self) -> None:
        """End the graph (its actors' background loops); quiet when the actors are already gone."""
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:  # actors killed or a node removed: nothing left to stop
                pass


def run_compiled(group, method: str, x: np.ndarray, args: tuple, what: str) -> list:
    """Every actor's (partial output, seconds) for ``method(args[0], x, *args[1:])`` through ``group``'s
    compiled graph (an ``ActorGroup``); a failure shuts the group down and is named as
    ``ActorGroup.gather`` names it."""
    ray = group.ray
    if group.failure is not None:
        group.gather([], what)  # raises: the group was shut down
    answers, graph = [], group.compiled
    try:
        refs = graph.execute(encode_request(method, x, args))
        graph.wait(method)
        for k, ref in enumerate(refs):
            try:
                answers.append(decode_answer(ref.get(timeout=group.timeout), x))
            except ray.exceptions.RayTaskError as e:  # an exception inside actor k's method
                cause = getattr(e, "cause", None)
                if isinstance(cause, Llama2npError):
                    group.fail(str(cause), cause)
                group.fail(f"{group.describe(k)} failed in {what}: {cause!r}")
    except (ray.exceptions.RayChannelTimeoutError, ray.exceptions.RayError) as e:
        _name_the_lost(group, what, e)
    graph.computed[method] = max(s for _, s in answers)
    return answers


def _name_the_lost(group, what: str, error: Exception):
    """The compiled graph timed out or broke: ask every actor a plain question to name the one lost."""
    ray = group.ray
    timed_out = isinstance(error, ray.exceptions.RayChannelTimeoutError)
    refs = [a.where.remote() for a in group.actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=min(group.timeout, PROBE_SECONDS))
    late = [k for k, r in enumerate(refs) if r in pending]
    dead = []
    for k, ref in enumerate(refs):
        if ref not in pending:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayError:
                dead.append(k)
    every = range(group.world)
    if timed_out and not dead:
        group.fail(f"{', '.join(group.describe(k) for k in late or every)} did not answer {what} "
                   f"within {group.timeout:g} s")
    group.fail(f"{', '.join(group.describe(k) for k in dead or late or every)} died during {what} "
               f"({type(error).__name__})")


def compile_reduction(ray, actors: list, timeout: float) -> CompiledReduction | None:
    """A compiled graph over ``actors``, or None when this Ray cannot compile one (plain calls then)."""
    try:
        return CompiledReduction(ray, actors, timeout)
    except Exception:  # no ray.dag (Ray < 2.32), or compiling failed: the plain calls work everywhere
        return None
