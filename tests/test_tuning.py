"""Decode tiles measured at first use and cached per CPU model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama2np.model import linear, tuning
from llama2np.model.storage import float32_to_bf16


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA2NP_DECODE_TILE", raising=False)
    monkeypatch.delenv("LLAMA2NP_TUNING", raising=False)
    yield
    linear.set_decode_tile(None)


def test_measure_times_every_candidate_and_restores_the_tile():
    linear.set_decode_tile(None)
    rates = tuning.measure_decode_tiles(candidates=(256, 1024), rounds=2, shape=(64, 32))
    assert set(rates) == {256, 1024} and all(r > 0 for r in rates.values())
    assert linear.decode_tile() is None


def test_choice_is_cached_per_cpu_model(monkeypatch):
    monkeypatch.setattr(tuning, "measure_decode_tiles", lambda: {c: float(c == 512 * 1024) for c in tuning.CANDIDATES})
    assert tuning.tuned_decode_tile() == 512 * 1024
    cached = json.loads(tuning.cache_file().read_text())
    (key,) = cached
    assert tuning.cpu_model() in key and cached[key]["decode_tile"] == 512 * 1024

    def fail():
        raise AssertionError("measured again although the choice is cached")

    monkeypatch.setattr(tuning, "measure_decode_tiles", fail)
    assert tuning.tuned_decode_tile() == 512 * 1024


def test_a_damaged_cache_is_measured_again(monkeypatch):
    tuning.cache_file().parent.mkdir(parents=True)
    tuning.cache_file().write_text("{not json")
    monkeypatch.setattr(tuning, "measure_decode_tiles", lambda: {c: float(c) for c in tuning.CANDIDATES})
    assert tuning.tuned_decode_tile() == max(tuning.CANDIDATES)


def test_environment_overrides(monkeypatch):
    monkeypatch.setattr(tuning, "measure_decode_tiles", lambda: pytest.fail("measured"))
    monkeypatch.setenv("LLAMA2NP_DECODE_TILE", "4096")
    assert tuning.tuned_decode_tile() == 4096
    monkeypatch.delenv("LLAMA2NP_DECODE_TILE")
    monkeypatch.setenv("LLAMA2NP_TUNING", "off")
    assert tuning.tuned_decode_tile() is None


def test_small_models_are_not_measured(monkeypatch):
    monkeypatch.setattr(tuning, "tuned_decode_tile", lambda: pytest.fail("measured"))
    tuning.tune_for(tuning.TUNE_BYTES - 1)
    assert linear.decode_tile() is None


def test_the_tile_size_changes_the_tiles_not_the_product():
    rng = np.random.default_rng(0)
    w = float32_to_bf16(rng.standard_normal((96, 64), dtype=np.float32))
    layer = linear.Linear(w, np.float32)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    linear.set_decode_tile(None)
    want = layer(x)
    linear.set_decode_tile(7 * 32)  # 7 rows of 32 pairs: a ragged last tile
    rows, tiles = layer._tiles(1)
    assert rows == 7 and len(tiles) == 14
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)  # BLAS may block rows differently
