"""HF checkpoints run with wq/wk as stored: the q/k outputs are reordered, the weights never copied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama2np.loaders import load_checkpoint
from llama2np.loaders.hf import unpermute
from llama2np.model.transformer import Transformer, halves_to_pairs

GOLDEN = Path(__file__).resolve().parent / "golden" / "layouts"


def _memory_of(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.mark.parametrize("heads, head_dim", [(1, 2), (3, 8), (4, 64)])
def test_halves_to_pairs_is_unpermute_on_outputs(heads, head_dim):
    """Reordering the outputs of HF's rows gives what Meta's rows (``unpermute``) compute."""
    rng = np.random.default_rng(heads)
    w = rng.standard_normal((heads * head_dim, 5))
    x = rng.standard_normal((2, 3, 5))
    hf_out = (x @ w.T).reshape(2, 3, heads, head_dim)
    meta_out = (x @ unpermute(w, heads).T).reshape(2, 3, heads, head_dim)
    np.testing.assert_array_equal(halves_to_pairs(hf_out), meta_out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hf_wq_wk_are_not_copied(dtype):
    """The stacked wqkv of an HF bf16 checkpoint holds the memory-mapped tensors themselves."""
    ckpt = load_checkpoint(GOLDEN / "hf_bf16")
    model = Transformer(ckpt.args, ckpt.state, dtype)
    wqkv = model.layers[0].attention.wqkv
    for part, name in zip(wqkv.parts, ("wq", "wk")):
        stored = ckpt.state.stored(f"layers.0.attention.{name}.weight")
        assert isinstance(_memory_of(stored), np.memmap)
        assert np.shares_memory(part, stored), f"{name} was copied"
    assert model.layers[0].attention.rope_halves


@pytest.mark.parametrize("layout", ["hf_bf16", "hf_fp32"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stored_order_gives_the_reordered_weights_logits(layout, dtype):
    """Same logits as a model given Meta-order copies of wq/wk (what the state dict hands out by name)."""
    ckpt = load_checkpoint(GOLDEN / layout)
    meta_order = {name: ckpt.state[name] for name in ckpt.state}  # a plain dict: no stored(), unpermuted
    ids = np.arange(3, 11)[None]
    want = Transformer(ckpt.args, meta_order, dtype).forward(ids)
    got_model = Transformer(ckpt.args, ckpt.state, dtype)
    assert got_model.layers[0].attention.rope_halves
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got_model.forward(ids), want, rtol=0, atol=tol)
    cache = got_model.new_cache(1, ids.shape[1])
    steps = [got_model.forward(ids[:, :5], 0, cache)] + [got_model.forward(ids[:, i:i + 1], i, cache)
                                                          for i in range(5, ids.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=0, atol=tol)
