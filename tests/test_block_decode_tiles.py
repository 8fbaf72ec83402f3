"""The tiles a one-row product (a decode step) over block-quantized weights runs: offsets split by
columns beside the codes' slabs, against the values ``gguf.quants.dequantize`` gives (llama.cpp's gguf-py)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')

from llama2np.loaders.gguf_blocks import decode_tensor  # noqa: E402
from llama2np.model import quant_blocks  # noqa: E402
from llama2np.model.quant_blocks import make_block_linear  # noqa: E402
from test_quant_blocks import gguf_values, random_blocks  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 3])
def test_offsets_in_many_tiles(monkeypatch, two_threads, n: int, dtype):
    """Offsets in tiles of 24 columns, over a Q4_K (offsets) part stacked
    with a Q8_0 (none) one: the product is x @ W.T of the stored values."""
    monkeypatch.setattr(quant_blocks, "DECODE_TILE_ELEMENTS", 24 * 16)  # 16 blocks: 24 offset columns a tile
    rng = np.random.default_rng(7)
    cols = 512
    raws = [(random_blocks(kind, rows, cols, rng), kind, rows) for kind, rows in (("Q4_K", 40), ("Q8_0", 33))]
    lin = make_block_linear([decode_tensor(r, k, (rows, cols), "t") for r, k, rows in raws], dtype)
    tiles = lin.offset_tiles(quant_blocks.DECODE_TILE_ELEMENTS)
    assert [(c0, c1) for *_, c0, c1 in tiles] == [(0, 24), (24, 48), (48, 72), (72, 73)]
    x = rng.standard_normal((n, cols)).astype(dtype)
    want = x.astype(np.float64) @ np.concatenate([gguf_values(r, k) for r, k, _ in raws]).T
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(lin(x), want, rtol=0, atol=tol * np.abs(want).max())
