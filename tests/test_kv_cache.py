"""The KV cache grows with the positions reached, keeping what it holds."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np import InputError
from llama2np.model.args import ModelArgs
from llama2np.model.kv_cache import KVCache
from llama2np.model.transformer import Transformer
from tiny_model import tiny_state


def test_kv_cache_grows_keeping_what_it_holds(monkeypatch):
    monkeypatch.setattr(KVCache, "INITIAL", 8)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=40)
    model = Transformer(args, tiny_state(args), "float64")
    ids = (np.arange(40) * 7 % 64).reshape(1, -1)
    cache = model.new_cache(1)
    assert cache.k.shape[3] == 8 and cache.max_seq_len == 40
    steps = [model.forward(ids[:, a:b], a, cache)[0] for a, b in [(0, 5), (5, 6), (6, 13), (13, 30), (30, 40)]]
    assert cache.k.shape[3] == 40  # 8 -> 16 -> 32 -> 40 (capped at max_seq_len)
    np.testing.assert_allclose(np.concatenate(steps), model.forward(ids)[0], rtol=0, atol=1e-12)
    assert cache.keep_rows(np.array([True]), 40).max_seq_len == 40
    with pytest.raises(InputError, match="exceed the context length 40"):
        model.forward(ids[:, :1], 40, cache)


