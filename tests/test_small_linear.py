"""Small float weights kept column-major (W.T contiguous) give the same products on every path."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np.model import linear
from llama2np.model.linear import Linear


@pytest.mark.parametrize("shape", [(96, 64), (4100, 288)])  # one thread / above SPLIT_ELEMENTS' split
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_column_major_weights_multiply_like_the_reference(shape, rows, dtype, monkeypatch):
    monkeypatch.setattr(linear, "SPLIT_ELEMENTS", 256 * 1024)  # the larger shape is split over threads
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((1, rows, shape[1])).astype(dtype)
    lin = Linear(w, np.dtype(dtype))
    assert lin.weight.flags.f_contiguous and lin.weight.shape == shape
    np.testing.assert_array_equal(lin.weight, w.astype(dtype))  # the same values, only laid out by columns
    want = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(lin(x), want, rtol=0, atol=1e-4 if dtype == "float32" else 1e-12)


def test_large_float_weights_stay_row_major(monkeypatch):
    monkeypatch.setattr(linear, "COLUMN_MAJOR_ELEMENTS", 1000)
    w = np.ones((64, 32), np.float32)
    lin = Linear(w, np.dtype(np.float32))
    assert lin.weight.flags.c_contiguous and not lin.weight.flags.f_contiguous
    np.testing.assert_array_equal(lin(np.ones((1, 32), np.float32)), np.full((1, 64), 32.0))


def test_long_rows_stay_row_major(monkeypatch):
    """A 7B's float weights (rows of 4096) are not copied: they stay as loaded (memory-mapped)."""
    monkeypatch.setattr(linear, "COLUMN_MAJOR_IN", 16)
    w = np.ones((8, 32), np.float32)
    lin = Linear(w, np.dtype(np.float32))
    assert lin.weight is w and lin.weight.flags.c_contiguous
