"""The block-major, transposed layout of quantized GGUF tensors and the slab tiles that multiply with it.

Reference values are ``gguf.quants.dequantize``'s (llama.cpp's gguf-py), as in test_quant_blocks.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')

from llama2np.loaders.gguf_blocks import KINDS, decode_tensor  # noqa: E402
from llama2np.model import quant_blocks  # noqa: E402
from llama2np.model.linear import run_tiles  # noqa: E402
from llama2np.model.quant_blocks import make_block_linear  # noqa: E402
from test_quant_blocks import gguf_values, random_blocks  # noqa: E402


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q4_1", "Q8_0"])
def test_codes_scales_and_offsets_sit_where_the_layout_says(kind: str):
    """Column b * B + k of row r is scale[b, r] * q[b, k, r] - offset[b, r]."""
    rng = np.random.default_rng(3)
    rows, cols = 5, 512
    raw = random_blocks(kind, rows, cols, rng)
    w = decode_tensor(raw, kind, (rows, cols), "t")
    n_blocks, block, held_rows = w.q.shape
    assert (held_rows, n_blocks * block) == (rows, cols) and block == KINDS[kind][1]
    values = w.scale[:, None, :].astype(np.float64) * w.q
    if w.offset is not None:
        values -= w.offset[:, None, :]
    natural = values.transpose(2, 0, 1).reshape(rows, cols)  # (rows, blocks, B) -> (rows, cols)
    np.testing.assert_array_equal(natural, gguf_values(raw, kind))


@pytest.mark.parametrize("n", [1, 2, 20])
def test_products_over_many_slabs_on_two_threads(monkeypatch, two_threads, n: int):
    """Slabs of 3 blocks (the last one short) shared by two threads give x @ W.T of the values."""
    monkeypatch.setattr(quant_blocks, "DECODE_TILE_ELEMENTS", 3 * 32 * 48)
    monkeypatch.setattr(quant_blocks, "PREFILL_TILE_ELEMENTS", 3 * 32 * 48)
    rng = np.random.default_rng(n)
    cols = 1024  # 32 blocks of Q4_K's 32: tiles of 3 blocks leave one of 2
    parts = [decode_tensor(random_blocks("Q4_K", r, cols, rng), "Q4_K", (r, cols), "t") for r in (48, 16)]
    lin = make_block_linear(parts, np.float64)
    assert len(lin.slabs(quant_blocks.DECODE_TILE_ELEMENTS)) == 11 + 4  # 48 rows: 3 blocks a tile; 16 rows: 9
    x = rng.standard_normal((n, cols))
    want = x @ np.concatenate([np.asarray(p) for p in parts]).T
    np.testing.assert_allclose(lin(x), want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_run_tiles_hands_each_tile_to_one_thread(two_threads):
    seen, names = [], set()

    def kernel(queue):
        for tile in queue:
            seen.append(tile)
            names.add(threading.current_thread().name)

    run_tiles(kernel, list(range(500)))
    assert sorted(seen) == list(range(500))
    run_tiles(kernel, [])  # no tiles: nothing runs, nothing fails
    assert len(seen) == 500
