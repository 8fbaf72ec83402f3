"""Tensor parallelism on Ray: actors that match one process, hold their slices only, and fail in bounded time.

One local Ray cluster (two nodes on this machine) serves the whole test session;
a closed model's actors are reused by the next model of the same size (actors
cost seconds to start).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama2np import Llama2
from llama2np.errors import DistributedError, Llama2npError
from llama2np.loaders import load_checkpoint
from llama2np.distributed.memory_plan import memory_plan

GOLDEN = Path(__file__).resolve().parent / "golden"
META = GOLDEN / "layouts" / "meta_2shard_fp32"  # Meta MP=2: N=2 reads one consolidated.0k.pth per actor
HF = GOLDEN / "layouts" / "hf_sharded_fp32"  # HF, two safetensors files: actors slice rows/columns
MQA_BF16 = GOLDEN / "mqa_bf16"  # one key/value head for every actor; bf16 weights stay bf16
IDS = [1, 17, 93, 4, 56, 21, 8, 77, 30]
PROMPTS = [[1, 17, 93], [1, 5, 44, 12, 9, 60]]  # a batch of two lengths: rows finish and leave the cache
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


# --- without Ray ---------------------------------------------------------------------------


def test_missing_ray_names_the_extra(monkeypatch):
    from llama2np.distributed.actors import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(Llama2npError, match=r"pip install 'llama2np\[distributed\]'"):
        import_ray()


# --- on Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of two nodes (two raylets on this machine, 2 CPUs each), for the session."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


CASES = [(META, 2, "float32"), (META, 2, "float64"), (META, 4, "float32"), (META, 4, "float64"),
         (HF, 2, "float32"), (HF, 2, "float64"), (HF, 4, "float32"), (HF, 4, "float64"), (MQA_BF16, 4, "float32")]


@pytest.mark.parametrize("path, world, dtype", CASES, ids=[f"{p.name}-N{n}-{d}" for p, n, d in CASES])
def test_logits_and_greedy_generation_match_one_process(ray_cluster, path, world, dtype):
    tp = Llama2.from_pretrained(path, dtype=dtype, tensor_parallel=world)
    single = Llama2.from_pretrained(path, dtype=dtype)
    try:
        got, want = tp.logits(IDS), single.logits(IDS)
        assert got.dtype == want.dtype == np.dtype(dtype)
        err = float(np.abs(got - want).max())
        print(f"{path.name} N={world} {dtype}: max |logit error| {err:.2e}")
        assert err <= TOLERANCE[dtype]
        if dtype == "float32":  # greedy decoding through the actors' KV caches; a batch whose rows end early
            got = tp.generate(PROMPTS, max_new_tokens=6, temperature=0.0, logprobs=True)
            want = single.generate(PROMPTS, max_new_tokens=6, temperature=0.0, logprobs=True)
            assert [c.ids for c in got] == [c.ids for c in want]
            np.testing.assert_allclose([c.logprobs for c in got], [c.logprobs for c in want], atol=1e-5)
            # one sequence: through the kept KV cache, then speculative decoding checking drafts in one pass
            prompt = [1, 17, 93, 4, 17, 93, 4, 17]
            want = single.generate(prompt, max_new_tokens=8, temperature=0.0)
            assert tp.generate(prompt, max_new_tokens=8, temperature=0.0) == want
            assert tp.generate(prompt, max_new_tokens=8, temperature=0.0, prompt_lookup=2) == want
    finally:
        tp.model.close()


@pytest.mark.parametrize("path, world, quantize", [(META, 2, None), (HF, 4, "int8")])
def test_actors_hold_their_slices_only(ray_cluster, path, world, quantize):
    """Each actor's weights are exactly what the plan counts for 1/N of the layers; the driver holds
    only the output projection."""
    tp = Llama2.from_pretrained(path, tensor_parallel=world, quantize=quantize)
    try:
        assert tp.model.linears() == [tp.model.output]
        plan = memory_plan(tp.args, world, storage="float32", quantize=quantize)
        assert tp.model.group.call("weight_bytes") == [plan.actor_weights] * world
    finally:
        tp.model.close()


def test_an_int8_checkpoint_is_cut_int8(ray_cluster, tmp_path):
    """A llama2np int8 checkpoint: actors take their rows (with their scales) and columns of the int8 values."""
    from llama2np.cli.commands import main

    assert main(["quantize", "--model", str(HF), "--out", str(tmp_path / "int8")]) == 0
    tp = Llama2.from_pretrained(tmp_path / "int8", tensor_parallel=2)
    single = Llama2.from_pretrained(tmp_path / "int8")
    try:
        assert tp.model.group.call("weight_bytes") == [memory_plan(tp.args, 2, quantize="int8").actor_weights] * 2
        np.testing.assert_allclose(tp.logits(IDS), single.logits(IDS), rtol=0, atol=1e-5)
    finally:
        tp.model.close()


def test_one_actor_per_node_when_the_cluster_has_enough_else_packed(ray_cluster):
    spread = Llama2.from_pretrained(META, tensor_parallel=2)
    packed = Llama2.from_pretrained(META, tensor_parallel=4)
    try:
        assert len({w["node"] for w in spread.model.group.where}) == 2  # STRICT_SPREAD over the 2 nodes
        assert len(packed.model.group.actors) == 4  # placed at all: 4 actors on 2 nodes must be packed
        np.testing.assert_allclose(spread.logits(IDS), packed.logits(IDS), atol=1e-5)
    finally:
        spread.model.close()
        packed.model.close()


def test_killed_actor_raises_distributed_error_in_bounded_time(ray_cluster):
    timeout = 20.0
    model = Llama2.from_pretrained(META, tensor_parallel=2, ray_timeout=timeout)
    stream = model.generate([1, 17, 93], max_new_tokens=40, temperature=0.0, stream=True)
    next(stream)
    victim = model.model.group.where[1]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(DistributedError, match=rf"actor 1 of 2 \(pid {victim['pid']} on node "):
        list(stream)
    assert time.perf_counter() - t0 < timeout
    with pytest.raises(DistributedError, match="load the model again"):
        model.logits(IDS)
    again = Llama2.from_pretrained(META, tensor_parallel=2)  # the driver can build a new one
    np.testing.assert_allclose(again.logits(IDS), Llama2.from_pretrained(META).logits(IDS), atol=1e-5)
    again.model.close()


def test_a_node_that_dies_raises_distributed_error_naming_it(ray_cluster):
    model = Llama2.from_pretrained(META, tensor_parallel=2, ray_timeout=20.0)
    stream = model.generate([1, 17, 93], max_new_tokens=40, temperature=0.0, stream=True)
    next(stream)
    worker = next(n for n in ray_cluster.worker_nodes)  # the node that is not the head (the driver's)
    rank = next(k for k, w in enumerate(model.model.group.where) if w["node"] == worker.node_id)
    t0 = time.perf_counter()
    ray_cluster.remove_node(worker)
    try:
        with pytest.raises(DistributedError, match=rf"actor {rank} of 2 .* on node .* {worker.node_id[:8]}\) died"):
            list(stream)
        assert time.perf_counter() - t0 < 20.0
    finally:
        ray_cluster.add_node(num_cpus=2)  # the session's cluster has two nodes again
        ray_cluster.wait_for_nodes()


def test_actor_that_stops_answering_raises_after_the_timeout(ray_cluster):
    model = Llama2.from_pretrained(META, tensor_parallel=2, ray_timeout=10.0)  # generous on a busy CI
    model.logits(IDS)
    pid = model.model.group.where[0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        with pytest.raises(DistributedError, match=r"actor 0 of 2 .* did not answer layer 0 attention within 10 s"):
            model.logits(IDS, reuse_cache=False)  # a forward pass, not the logits kept from the call above
        assert time.perf_counter() - t0 < 30
    finally:
        os.kill(pid, signal.SIGCONT)  # the actor was killed with its group; this only wakes a leftover


def test_actor_refuses_a_slice_bigger_than_free_memory(ray_cluster):
    from llama2np.distributed.actors import _Worker

    spec = {"args": load_checkpoint(META).args.to_params(), "rank": 0, "world": 2, "dtype": "float32",
            "quantize": None, "storage": "float32", "source": str(META), "own_shard": True, "threads": 1,
            "on_node": 10 ** 9}  # a billion actors on this node
    with pytest.raises(DistributedError, match=r"actor 0 on node .*: 1000000000 actor\(s\) on this node need "
                                               r".* but only .* is available: add machines"):
        _Worker().load(spec)


# --- the command line -----------------------------------------------------------------------


def test_cli_logits_with_tensor_parallel(ray_cluster, tmp_path, capsys):
    from llama2np.cli.commands import main

    ids = " ".join(map(str, IDS))
    assert main(["logits", "--model", str(HF), "--ids", ids, "--out", str(tmp_path / "tp.npy"),
                 "--tensor-parallel", "2"]) == 0
    assert main(["logits", "--model", str(HF), "--ids", ids, "--out", str(tmp_path / "one.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "tp.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)
