"""Checkpoint loaders: layout detection, the llama2.c / HF / Meta readers, and every bad-input error."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path
from llama2np import Llama2
from llama2np.loaders import load_checkpoint


def test_stories260k_loads_through_llama2c_path():
    path = shared_path("stories260K", "stories260K.bin")
    ckpt = load_checkpoint(path)
    assert ckpt.layout == "llama2c"
    assert (ckpt.args.dim, ckpt.args.n_layers, ckpt.args.n_kv_heads, ckpt.args.vocab_size) == (64, 5, 4, 512)
    assert ckpt.state["output.weight"] is ckpt.state["tok_embeddings.weight"]  # positive vocab: tied
    model = Llama2.from_pretrained(path.parent)  # the directory works too, and finds tok512.model
    assert model.tokenizer.path.name == "tok512.model"
    logits = model.logits(model.tokenizer.encode("Once upon a time"))
    assert logits.shape == (5, 512) and np.isfinite(logits).all()
