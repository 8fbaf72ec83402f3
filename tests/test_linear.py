"""Linear: the fast paths (stacked, bf16/fp16 tiles, threads) against the plain numpy product; memory-map pages."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from llama2np.errors import CheckpointError
from llama2np.model import linear as linear_mod
from llama2np.model import threads as parallel
from llama2np.model.linear import Linear
from llama2np.model.mapped import release_pages
from llama2np.model.storage import bf16_to_float32, float32_to_bf16

rng = np.random.default_rng(0)


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


@pytest.mark.parametrize("rows", [1, 70])
def test_stacked_float_weights_give_the_product_of_each(rows):
    parts = [rng.standard_normal((n, 1100)).astype(np.float32) for n in (24, 8)]
    lin = Linear(parts, np.float32)
    assert lin.shape == (32, 1100) and not lin.tiled
    x = rng.standard_normal((1, rows, 1100)).astype(np.float32)
    np.testing.assert_allclose(lin(x), x @ np.concatenate(parts).T, rtol=1e-4, atol=1e-4)


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
