"""int8 weight-only quantisation, and the fast Linear paths (stacked, bf16 tiles, threads) against plain numpy."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from llama2np import Llama2
from llama2np.model import linear as linear_mod
from llama2np.model import threads as parallel
from llama2np.model import storage as tensors_mod
from llama2np.errors import CheckpointError, InputError
from llama2np.model.linear import Int8Linear, Linear, quantize_int8, release_pages
from llama2np.model.args import ModelArgs
from llama2np.model.transformer import Transformer
from llama2np.model.storage import bf16_to_float32, float32_to_bf16

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


@pytest.mark.parametrize("rows", [1, 3, 20, 70, linear_mod.WHOLE_ROWS + 1])  # the last: whole-matrix widening
@pytest.mark.parametrize("threads", [1, 2])
def test_stacked_and_bf16_tiled_linear_equal_the_plain_product(rows, threads, monkeypatch):
    monkeypatch.setattr(linear_mod, "TILE_ELEMENTS", 7 * 50)  # many tiles, a ragged last one
    monkeypatch.setattr(linear_mod, "BIG_TILE_ELEMENTS", 11 * 50)
    parts = [float32_to_bf16(rng.standard_normal((n, 50)).astype(np.float32)) for n in (33, 16, 16)]
    widened = np.concatenate([bf16_to_float32(p) for p in parts])
    x = rng.standard_normal((1, rows, 50)).astype(np.float32)
    parallel.set_num_threads(threads)
    try:
        tiled, plain = Linear(parts, np.float32), Linear(widened, np.float32)
        assert tiled.tiled and not plain.tiled
        want = x @ widened.T
        np.testing.assert_allclose(tiled(x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(plain(x), want, rtol=1e-5, atol=1e-5)
        for got, part, lo in zip(tiled.split(tiled(x)), parts, (0, 33, 49)):
            np.testing.assert_allclose(got, want[..., lo : lo + part.shape[0]], rtol=1e-5, atol=1e-5)
    finally:
        parallel.set_num_threads(parallel._cpu_count())


@pytest.mark.parametrize("rows", [1, 12, linear_mod.WHOLE_ROWS])
@pytest.mark.parametrize("layout", ["odd in_features", "column slice"])
def test_bf16_tiles_that_cannot_be_read_as_pairs_are_widened_whole(rows, layout, monkeypatch):
    monkeypatch.setattr(linear_mod, "TILE_ELEMENTS", 5 * 51)
    full = float32_to_bf16(rng.standard_normal((40, 102)).astype(np.float32))
    part = full[:, :51] if layout == "odd in_features" else full[:, ::2]  # 51 columns / stride 4 bytes
    lin = Linear([part, part[:9]], np.float32)
    assert lin.tiled and not lin._paired
    widened = bf16_to_float32(np.concatenate([part, part[:9]]))
    x = rng.standard_normal((rows, part.shape[1])).astype(np.float32)
    np.testing.assert_allclose(lin(x), x @ widened.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 30])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("storage", ["bf16", "fp16"])
@pytest.mark.parametrize("compute", [np.float64, np.float32])
def test_16_bit_weights_widen_tile_by_tile(rows, threads, storage, compute, monkeypatch):
    """bf16/fp16 weights stay as stored and are widened tile by tile (no float copy of the matrix)."""
    monkeypatch.setattr(linear_mod, "TILE_ELEMENTS", 7 * 64)
    monkeypatch.setattr(linear_mod, "BIG_TILE_ELEMENTS", 9 * 64)
    if storage == "bf16":
        parts = [float32_to_bf16(rng.standard_normal((n, 64)).astype(np.float32)) for n in (40, 23)]
        exact = np.concatenate([bf16_to_float32(p) for p in parts]).astype(np.float64)
    else:
        parts = [rng.standard_normal((n, 64)).astype(np.float16) for n in (40, 23)]
        exact = np.concatenate(parts).astype(np.float64)
    x = rng.standard_normal((rows, 64)).astype(compute)
    parallel.set_num_threads(threads)
    try:
        lin = Linear(parts, compute)
        assert lin.tiled and lin.parts[0] is parts[0]
        got = lin(x)
    finally:
        parallel.set_num_threads(parallel._cpu_count())
    assert got.dtype == compute
    tol = 1e-13 if compute == np.float64 else 1e-5
    np.testing.assert_allclose(got, x @ exact.T.astype(compute), rtol=tol, atol=tol)


def test_fp16_pairs_widen_to_exactly_numpys_float32_for_every_finite_value():
    """Every finite float16 bit pattern (zeros, subnormals, the largest), in both halves of a pair."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    finite = bits[(bits & 0x7FFF) < 0x7C00]
    pairs = finite | (finite[::-1] << 16)  # each value once in the low (even) and once in the high (odd) half
    want = pairs.view(np.float16).astype(np.float32)  # (even, odd, even, odd, ...)
    even, odd = np.empty_like(pairs), np.empty_like(pairs)
    tensors_mod.fp16_pair_even(pairs, even)
    tensors_mod.fp16_pair_odd(pairs, odd)
    np.testing.assert_array_equal(even.view(np.float32), want[0::2])
    np.testing.assert_array_equal(odd.view(np.float32), want[1::2])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_fp16_weights_holding_inf_or_nan_are_refused(bad):
    w = rng.standard_normal((8, 64)).astype(np.float16)
    w[3, 5] = bad
    with pytest.raises(CheckpointError, match="inf or NaN"):
        Linear(w, np.float32)


def test_stacked_parts_must_share_in_features():
    with pytest.raises(ValueError, match="equal in_features"):
        Linear([np.zeros((4, 3), np.float32), np.zeros((4, 5), np.float32)], np.float32)


def test_release_pages_keeps_the_data_of_a_memory_map(tmp_path):
    path = tmp_path / "w.bin"
    data = rng.standard_normal(3 * mmap.PAGESIZE).astype(np.float32)
    data.tofile(path)
    w = np.memmap(path, dtype=np.float32, mode="r", offset=4 * 10, shape=(1000, 3))
    before = np.array(w)
    release_pages(w)
    np.testing.assert_array_equal(w, before)
    heap = data.copy()
    release_pages(heap)  # not a memory map: nothing happens
    np.testing.assert_array_equal(heap, data)


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


@pytest.mark.parametrize("rows", [1, 70])
def test_stacked_float_weights_give_the_product_of_each(rows):
    parts = [rng.standard_normal((n, 1100)).astype(np.float32) for n in (24, 8)]
    lin = Linear(parts, np.float32)
    assert lin.shape == (32, 1100) and not lin.tiled
    x = rng.standard_normal((1, rows, 1100)).astype(np.float32)
    np.testing.assert_allclose(lin(x), x @ np.concatenate(parts).T, rtol=1e-4, atol=1e-4)


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


def test_blas_threads_sets_the_blas_library_and_restores_it():
    from threadpoolctl import threadpool_info

    def blas():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    if not blas():
        pytest.skip("NumPy's BLAS is not one threadpoolctl controls")
    with parallel.blas_threads(1):
        assert blas() == {1}
    assert blas() == {parallel.num_threads()}


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_model_from_16_bit_weights_widens_tiles_and_matches_a_float_copy(storage, compute):
    """Issue 15 item 4: float64 (and float32) logits of a bf16/fp16 checkpoint without a float copy of any matrix."""
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


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_big_float_weights_split_over_threads_give_the_plain_product(rows, threads, monkeypatch):
    monkeypatch.setattr(linear_mod, "SPLIT_ELEMENTS", 7 * 30)  # blocks of 7 rows, a ragged last one
    parts = [rng.standard_normal((n, 30)) for n in (40, 13)]
    x = rng.standard_normal((1, rows, 30))
    parallel.set_num_threads(threads)
    try:
        got = Linear(parts, np.float64)(x)
    finally:
        parallel.set_num_threads(parallel._cpu_count())
    np.testing.assert_allclose(got, x @ np.concatenate(parts).T, rtol=1e-13, atol=1e-13)
