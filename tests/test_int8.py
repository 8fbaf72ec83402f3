"""int8 weight-only quantisation: per-row scales, Int8Linear, `quantize` checkpoints, accuracy on golden fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from llama2np import Llama2
from llama2np.errors import InputError
from llama2np.model import linear as linear_mod
from llama2np.model.args import ModelArgs
from llama2np.model.linear import Int8Linear, quantize_int8
from llama2np.model.storage import bf16_to_float32, float32_to_bf16
from llama2np.model.transformer import Transformer

GOLDEN = Path(__file__).resolve().parent / "golden"
rng = np.random.default_rng(0)


def test_quantize_int8_error_is_at_most_half_a_step_per_row():
    w = rng.standard_normal((300, 70)).astype(np.float32) * np.linspace(0.01, 3, 300, dtype=np.float32)[:, None]
    w[7] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.shape == (300,)
    assert np.abs(q).max() == 127
    err = np.abs(q * scale[:, None] - w)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5))
    assert not q[7].any()


def test_quantize_from_bf16_equals_quantize_from_its_float32_values():
    w = float32_to_bf16(rng.standard_normal((64, 48)).astype(np.float32))
    q1, s1 = quantize_int8(w)
    q2, s2 = quantize_int8(bf16_to_float32(w))
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("rows", [1, 3, 5, 40, linear_mod.WHOLE_ROWS])  # the last: whole-matrix widening
def test_int8_linear_matches_dequantised_float_matmul(rows, monkeypatch):
    monkeypatch.setattr(linear_mod, "INT8_TILE_ELEMENTS", 5 * 96)  # several tiles, a ragged last one
    monkeypatch.setattr(linear_mod, "BIG_TILE_ELEMENTS", 7 * 96)
    parts = [rng.standard_normal((n, 96)).astype(np.float32) for n in (64, 32, 32)]
    lin = Int8Linear(parts, np.float32)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    q, s = quantize_int8(np.concatenate(parts))
    want = x @ (q * s[:, None]).T
    np.testing.assert_allclose(lin(x), want, rtol=1e-4, atol=1e-4)
    # and it stays close to the unquantised product
    exact = x @ np.concatenate(parts).T
    assert np.abs(lin(x) - exact).max() < 0.05 * np.abs(exact).max()


def test_unknown_quantize_mode_is_an_input_error():
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=5, hidden_dim=8)
    with pytest.raises(InputError, match="quantize"):
        Transformer(args, {}, "float32", quantize="int4")


def golden_fixtures():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    return sorted(n for n, e in manifest.items() if e["kind"] in ("meta", "hf"))


@pytest.mark.parametrize("name", golden_fixtures()[:4])
def test_int8_top1_agrees_with_float32_on_golden_fixtures(name):
    entry = json.loads((GOLDEN / "manifest.json").read_text())[name]
    with np.load(GOLDEN / entry["reference"]) as z:
        ids = z["ids"]
    ref = Llama2.from_pretrained(GOLDEN / entry["dir"]).logits(ids)
    q = Llama2.from_pretrained(GOLDEN / entry["dir"], quantize="int8").logits(ids)
    assert (ref.argmax(-1) == q.argmax(-1)).mean() >= 0.99
    assert np.abs(q - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_stories260k_greedy_text_matches_llama2c_for_50_tokens():
    checkpoint = shared_path("stories260K", "stories260K.bin")
    want = [int(t) for t in shared_path("reference", "stories260K_greedy_200_ids.txt").read_text().split()]
    model = Llama2.from_pretrained(checkpoint, quantize="int8",
                                   tokenizer_path=shared_path("stories260K", "tok512.model")).model
    cache, ids = model.new_cache(1, 60), [1]
    for pos in range(50):
        ids.append(int(model.forward(np.array([[ids[-1]]]), pos, cache)[0, -1].argmax()))
    assert ids == want[:51]


@pytest.mark.parametrize("name,dtype", [("mqa_bf16", "float32"), ("layouts/hf_bf16", "float64"), ("gqa2", "float32")])
def test_quantized_checkpoint_gives_the_logits_of_quantizing_at_load(name, dtype, tmp_path):
    from llama2np.cli.commands import main

    src, out = GOLDEN / name, tmp_path / "int8"
    assert main(["quantize", "--model", str(src), "--out", str(out)]) == 0
    with np.load(GOLDEN / json.loads((GOLDEN / "manifest.json").read_text())[name]["reference"]) as z:
        ids = z["ids"]
    at_load = Llama2.from_pretrained(src, dtype=dtype, quantize="int8")
    stored = Llama2.from_pretrained(out, dtype=dtype)
    assert all(isinstance(m, Int8Linear) for m in stored.model.linears())
    assert isinstance(stored.model.linears()[0].parts[0], np.memmap)  # read from the file, not copied
    want = at_load.logits(ids, reuse_cache=False)
    np.testing.assert_array_equal(stored.logits(ids, reuse_cache=False), want)
    # asking for int8 again changes nothing
    again = Llama2.from_pretrained(out, dtype=dtype, quantize="int8")
    np.testing.assert_array_equal(again.logits(ids, reuse_cache=False), want)


def test_quantize_refuses_a_non_empty_out_dir_and_a_foreign_int8_config(tmp_path):
    from llama2np.errors import CheckpointError
    from llama2np.loaders.int8_writer import quantize_checkpoint

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty directory"):
        quantize_checkpoint(GOLDEN / "gqa2", tmp_path / "x")
    out = quantize_checkpoint(GOLDEN / "gqa2", tmp_path / "q")
    config = json.loads((out / "llama2np.json").read_text())
    (out / "llama2np.json").write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        Llama2.from_pretrained(out)


