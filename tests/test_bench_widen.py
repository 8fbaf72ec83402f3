"""scripts/bench/bench_widen.py: every candidate kernel computes the product Linear does (its speeds are printed, never asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))

import bench_widen  # noqa: E402

from llama2np.model.linear import Linear  # noqa: E402
from llama2np.model.storage import BF16  # noqa: E402


@pytest.mark.parametrize("kernel", [bench_widen.side, bench_widen.cast, bench_widen.strided])
@pytest.mark.parametrize("threads", [1, 2])
def test_candidate_kernels_compute_the_linear_product(kernel, threads):
    bits = bench_widen.random_bf16(96, 64)
    x = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    wide = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # bf16 widened independently
    expected = wide @ x
    np.testing.assert_allclose(Linear(bits.view(BF16), np.float32)(x[None])[0], expected, rtol=1e-5, atol=1e-6)
    y = bench_widen.tiled(kernel, bits, x, 10, threads)  # tiles of 10 rows, the last one short
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_the_script_runs_on_a_small_matrix():
    assert bench_widen.main(["--shape", "64,256", "--rounds", "1", "--threads", "1", "--tile", "4096"]) == 0
