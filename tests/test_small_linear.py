"""Small float weights (kept row-major as given; one input row multiplied by row dot products) give the same
products on every path."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np.model import linear
from llama2np.model import threads as parallel
from llama2np.model.linear import Linear, row_dots


@pytest.mark.parametrize("shape", [(96, 64), (4100, 288)])  # one thread / above SPLIT_ELEMENTS' split
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_float_weights_multiply_like_the_reference(shape, rows, dtype, monkeypatch):
    monkeypatch.setattr(linear, "SPLIT_ELEMENTS", 256 * 1024)  # the larger shape is split over threads
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((1, rows, shape[1])).astype(dtype)
    lin = Linear(w, np.dtype(dtype))
    assert lin.weight.flags.c_contiguous and lin.weight.shape == shape
    np.testing.assert_array_equal(lin.weight, w.astype(dtype))
    want = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(lin(x), want, rtol=0, atol=1e-4 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("in_features", [32, 4096])
def test_float32_weights_are_not_copied(in_features):
    """Float weights in the compute dtype stay as loaded (a memory map stays one)."""
    w = np.ones((8, in_features), np.float32)
    lin = Linear(w, np.dtype(np.float32))
    assert lin.weight is w
    np.testing.assert_array_equal(lin(np.ones((1, in_features), np.float32)), np.full((1, 8), float(in_features)))


@pytest.mark.parametrize("threads", [1, 2])
def test_one_row_split_over_threads_equals_the_unsplit_row_dots(threads, monkeypatch):
    """Blocks of rows on our threads compute each output as the same dot product as one call over all rows."""
    monkeypatch.setattr(linear, "SPLIT_ELEMENTS", 7 * 48)  # blocks of 7 rows, a ragged last one
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 48)).astype(np.float32) for n in (40, 13)]
    x = rng.standard_normal((1, 1, 48)).astype(np.float32)
    lin = Linear(parts, np.dtype(np.float32))
    before = parallel.num_threads()
    parallel.set_num_threads(threads)
    try:
        got = lin(x)
    finally:
        parallel.set_num_threads(before)
    np.testing.assert_array_equal(got[0, 0], row_dots(np.concatenate(parts), x[0, 0]))
    np.testing.assert_allclose(got, x @ np.concatenate(parts).T, rtol=1e-5, atol=1e-5)


def test_row_dots_is_the_matrix_vector_product():
    rng = np.random.default_rng(7)
    w, x = rng.standard_normal((33, 17)), rng.standard_normal(17)
    out = np.empty(33)
    assert row_dots(w, x, out=out) is out
    np.testing.assert_allclose(out, w @ x, rtol=1e-13, atol=1e-13)
