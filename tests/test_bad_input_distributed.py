"""Tensor parallelism given bad input: an unreachable cluster, and Meta shards that are not one per actor."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama2np import Llama2, ModelArgs
from llama2np.distributed.shard import Shard, meta_shards_are_slices, read_slice
from llama2np.loaders import load_checkpoint
from llama2np.model.transformer import build_layer, causal_mask, linear_maker, rope_tables
from llama2np.testing.synthetic import random_source, write_meta

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"
#: one key/value head, cut by fairscale into two Meta shards (each holds half of it)
ONE_KV_HEAD = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32, vocab_size=64, max_seq_len=32)
IDS = [1, 17, 9, 4, 56, 21]


@pytest.fixture(scope="module")
def one_kv_head_meta(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mqa") / "meta"
    write_meta(out, ONE_KV_HEAD, random_source(ONE_KV_HEAD, "float32"), "float32", n_shards=2)
    return out


def test_unreachable_cluster_is_one_error_within_the_timeout():
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llama2np", "generate", "--model", str(DEMO), "--tensor-parallel",
                           "2", "--ray-address", "127.0.0.1:1", "--max-new-tokens", "1"],
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(err) <= 2 and "127.0.0.1:1" in err[-1] and "cannot join the Ray cluster" in err[-1], err
    assert time.perf_counter() - t0 < 60


def test_shards_cutting_a_kv_head_are_not_read_one_per_actor(one_kv_head_meta: Path):
    """Without Ray: each rank's slice, cut from the whole checkpoint, adds up to the full layer."""
    ckpt = load_checkpoint(one_kv_head_meta)
    args, dtype = ckpt.args, np.dtype(np.float64)
    assert not meta_shards_are_slices(args, 2, 2)
    full_att, _ = build_layer(args, ckpt.state, 0, linear_maker(ckpt.state, dtype))
    x = np.random.default_rng(0).standard_normal((1, 5, args.dim))
    rotation, mask = rope_tables(args, dtype)[:5], causal_mask(5, 0, dtype)
    total = np.zeros_like(x)
    for k in range(2):
        part = read_slice(one_kv_head_meta, args, Shard(k, 2), own_shard=False)
        att, _ = build_layer(args, part, 0, linear_maker(part, dtype))
        total += att(x, 0, rotation, mask)
    np.testing.assert_allclose(total, full_att(x, 0, rotation, mask), atol=1e-12)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (unless this process already joined one), ended with the module."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def test_tensor_parallel_equal_to_the_shard_count_with_fewer_kv_heads(ray_local, one_kv_head_meta: Path):
    tp = Llama2.from_pretrained(one_kv_head_meta, tensor_parallel=2)
    try:
        np.testing.assert_allclose(tp.logits(IDS), Llama2.from_pretrained(one_kv_head_meta).logits(IDS), atol=1e-5)
    finally:  # kill the actors rather than keep them idle: this module's Ray ends with it
        tp.model.group.close()
