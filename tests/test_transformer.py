"""The Transformer: 16-bit weights decode like a float copy; the RoPE table grows with the positions reached."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np.model.args import ModelArgs
from llama2np.model.storage import bf16_to_float32, float32_to_bf16
from llama2np.model.transformer import Transformer, rope_tables
from tiny_model import tiny_state


def test_bf16_model_decodes_like_its_float32_copy():
    """bf16 weights take the tiled path (our threads) and float32 weights the BLAS-threaded one;
    incremental decoding through either gives the same logits."""
    from tiny_model import tiny_args, tiny_state

    args = tiny_args()
    bf16 = {k: float32_to_bf16(v) for k, v in tiny_state(args).items()}
    widened = {k: bf16_to_float32(v) for k, v in bf16.items()}
    tiled, plain = Transformer(args, bf16, "float32"), Transformer(args, widened, "float32")
    assert tiled.tiled and not plain.tiled
    assert len(plain.linears()) == 4 * args.n_layers + 1
    tokens = np.array([[1, 17, 42, 5, 99, 3]])
    outs = []
    for model in (tiled, plain):
        cache = model.new_cache(1, 16)
        steps = [model.forward(tokens[:, :3], 0, cache)[:, -1]]
        steps += [model.forward(tokens[:, i : i + 1], i, cache)[:, -1] for i in range(3, 6)]
        outs.append(np.concatenate(steps))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1][-1], plain.forward(tokens)[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_model_from_16_bit_weights_widens_tiles_and_matches_a_float_copy(storage, compute):
    """float64 (and float32) logits of a bf16/fp16 checkpoint without a float copy of any matrix."""
    from tiny_model import tiny_args, tiny_state

    args = tiny_args()
    state = tiny_state(args)
    stored = {k: float32_to_bf16(v) if storage == "bf16" else v.astype(np.float16) for k, v in state.items()}
    widened = {k: (bf16_to_float32(v) if storage == "bf16" else v).astype(compute) for k, v in stored.items()}
    tiled, copy = Transformer(args, stored, compute), Transformer(args, widened, compute)
    assert all(m.tiled for m in tiled.linears()) and not any(m.tiled for m in copy.linears())
    assert all(p.dtype.itemsize == 2 for m in tiled.linears() for p in m.parts)
    tokens = np.array([[1, 17, 42, 5, 99, 3]])
    tol = 1e-12 if compute == "float64" else 1e-5
    np.testing.assert_allclose(tiled.forward(tokens), copy.forward(tokens), rtol=tol, atol=tol)


def test_rope_table_grows_to_what_calls_reach():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=64, max_seq_len=1000)
    model = Transformer(args, tiny_state(args), "float64")
    cache = model.new_cache(1, 700)
    ids = np.arange(700).reshape(1, -1) % 64
    model.forward(ids[:, :300], 0, cache)
    assert len(model.rope.table) == 300
    step = model.forward(ids[:, 300:700], 300, cache)
    assert 700 <= len(model.rope.table) <= 1000
    np.testing.assert_allclose(model.rope.table[:700], rope_tables(args, np.float64, 700), rtol=0, atol=1e-15)
    whole = model.forward(ids)  # no cache: the table as it is now
    np.testing.assert_allclose(step[0], whole[0, 300:], rtol=0, atol=1e-9)


