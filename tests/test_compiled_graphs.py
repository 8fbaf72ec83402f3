"""Tensor-parallel reductions through a Ray Compiled Graph: the same logits as one process, and a
killed actor named in bounded time, as with plain actor calls (tests/test_actors.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from llama2np import Llama2
from llama2np.errors import DistributedError

META = Path(__file__).resolve().parent / "golden" / "layouts" / "meta_2shard_fp32"
IDS = [1, 17, 93, 4, 56, 21, 8, 77, 30]


@pytest.fixture(scope="module")
def compiled():
    """A local Ray (unless this process already joined one) with compiled graphs switched on."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.dag")
    from llama2np.distributed import actors

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    before, actors.COMPILED_GRAPHS = actors.COMPILED_GRAPHS, True
    yield ray
    actors.COMPILED_GRAPHS = before
    # Ray stays up for the rest of the session (test_actors.py's cluster, when it started first)


def test_compiled_reductions_match_one_process(compiled):
    tp = Llama2.from_pretrained(META, tensor_parallel=2)
    one = Llama2.from_pretrained(META)
    try:
        np.testing.assert_allclose(tp.logits(IDS), one.logits(IDS), atol=1e-5)
        assert tp.model.group.compiled, "the reductions did not go through a compiled graph"
        got = tp.generate(IDS[:3], max_new_tokens=6, temperature=0.0)
        assert got == one.generate(IDS[:3], max_new_tokens=6, temperature=0.0)
    finally:
        tp.model.group.close()


def test_killed_actor_is_named_within_the_timeout(compiled):
    timeout = 20.0
    model = Llama2.from_pretrained(META, tensor_parallel=2, ray_timeout=timeout)
    stream = model.generate([1, 17, 93], max_new_tokens=40, temperature=0.0, stream=True)
    next(stream)
    assert model.model.group.compiled
    victim = model.model.group.where[1]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match=rf"actor 1 of 2 \(pid {victim['pid']} on node .* died during"):
        list(stream)
    assert time.perf_counter() - t0 < timeout
    with pytest.raises(DistributedError, match="load the model again"):
        model.logits(IDS)


CHILD = r"""
import os, signal, sys
import ray
from llama2np import Llama2
from llama2np.distributed import actors
from llama2np.errors import DistributedError

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
actors.COMPILED_GRAPHS = True
model = Llama2.from_pretrained(sys.argv[1], tensor_parallel=2, ray_timeout=20.0)
stream = model.generate([1, 17, 93], max_new_tokens=40, temperature=0.0, stream=True)
next(stream)
assert model.model.group.compiled, "the decode reductions did not go through a compiled graph"
os.kill(model.model.group.where[1]["pid"], signal.SIGKILL)
try:
    list(stream)
except DistributedError as e:
    kept = e  # held to the end, as a test runner holds what it caught
print("failed as expected:", kept, flush=True)
ray.shutdown()
print("shut down", flush=True)
"""


def test_a_process_that_used_a_graph_exits_cleanly():
    """A graph whose actor died mid-decode, its error kept, then ``ray.shutdown()`` and the interpreter's
    exit: status 0 (no channel memory is touched after Ray is gone). A child process with its own Ray."""
    pytest.importorskip("ray.dag")
    import subprocess
    import sys

    import llama2np

    env = {**os.environ, "PYTHONPATH": str(Path(llama2np.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(META)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert "failed as expected: actor 1 of 2" in done.stdout and "shut down" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_requests_and_answers_cross_the_channels_as_bytes_unchanged(dtype):
    """The graph's wire format (no Ray needed): method, layer, start position, a cache id or None and the
    (batch, seq, dim) input come back as sent; an answer keeps its values and seconds."""
    from llama2np.distributed.compiled import decode_answer, decode_request, encode_answer, encode_request

    x = np.random.default_rng(0).standard_normal((2, 1, 12)).astype(dtype)
    for method, args in [("attention", (3, 17, 5)), ("attention", (0, 4, None)), ("feed_forward", (7,))]:
        request = encode_request(method, x, args)
        assert isinstance(request, bytes)
        got_method, got_x, got_args = decode_request(request)
        assert (got_method, got_args) == (method, list(args))
        assert got_x.dtype == x.dtype and got_x.shape == x.shape and np.array_equal(got_x, x)
    part, seconds = decode_answer(encode_answer(2 * x, 0.125), x)
    assert seconds == 0.125 and part.dtype == x.dtype and np.array_equal(part, 2 * x)
