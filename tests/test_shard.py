"""Tensor-parallel slices, without Ray: the slices of a layer add up to the layer; uneven splits are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama2np.errors import ConfigError
from llama2np.loaders import load_checkpoint
from llama2np.model.transformer import build_layer, causal_mask, linear_maker, rope_tables
from llama2np.distributed.shard import Shard, shard_state

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("world", [2, 6])
def test_slices_add_up_to_the_layer(world):
    """gqa2: 6 heads, 2 key/value heads. N=2: 3 heads and 1 KV head each; N=6: KV heads replicated."""
    ckpt = load_checkpoint(GOLDEN / "gqa2")
    args, dtype = ckpt.args, np.dtype(np.float64)
    full_att, full_ffn = build_layer(args, ckpt.state, 1, linear_maker(ckpt.state, dtype))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, args.dim))
    rotation, mask = rope_tables(args, dtype)[:5], causal_mask(5, 0, dtype)
    att, ffn = np.zeros_like(x), np.zeros_like(x)
    for k in range(world):
        part = shard_state(load_checkpoint(GOLDEN / "gqa2").state, args, Shard(k, world))
        a, f = build_layer(args, part, 1, linear_maker(part, dtype))
        assert a.n_heads == 6 // world and a.n_kv_heads == max(1, 2 // world)
        att += a(x, 0, rotation, mask)
        ffn += f(x)
    np.testing.assert_allclose(att, full_att(x, 0, rotation, mask), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ffn, full_ffn(x), rtol=0, atol=1e-12)


def test_uneven_split_is_refused():
    args = load_checkpoint(GOLDEN / "gqa2").args  # 6 heads, 2 KV heads
    with pytest.raises(ConfigError, match="tensor_parallel=4 .*n_heads=6 is not divisible"):
        Shard(0, 4).check(args)


