"""Weight matrices and the one operation they take part in: y = x @ W.T.

Weights are kept as the checkpoint stores them, shape (out_features,
in_features) like ``torch.nn.Linear``. A float weight is converted to the
compute dtype once. A bf16 weight under float32 compute stays bf16 (half the
memory, usually a memory map) and is widened a tile of rows at a time into a
reused buffer, so no weight-sized float32 copy ever exists.
"""

from __future__ import annotations

import numpy as np

from .tensors import bf16_to_float32, is_bf16

#: rows of a bf16 weight widened per tile: 256 rows x 4096 columns x 4 bytes = 4 MiB, cache-sized
TILE_ROWS = 256


class Linear:
    """A weight matrix W of shape (out_features, in_features); calling it computes x @ W.T."""

    def __init__(self, weight: np.ndarray, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        if weight.ndim != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {weight.shape}")
        self.bf16 = is_bf16(weight) and self.dtype == np.float32
        self.weight = weight if self.bf16 else np.asarray(_widen(weight), dtype=self.dtype)
        self._tile: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (..., in_features) -> (..., out_features)
        if not self.bf16:
            return x @ self.weight.T
        out_features, in_features = self.weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        y = np.empty((x2.shape[0], out_features), dtype=self.dtype)
        if self._tile is None:
            self._tile = np.empty((min(TILE_ROWS, out_features), in_features), dtype=np.float32)
        for r0 in range(0, out_features, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, out_features)
            tile = bf16_to_float32(self.weight[r0:r1], out=self._tile[: r1 - r0])
            np.matmul(x2, tile.T, out=y[:, r0:r1])
        return y.reshape(*lead, out_features)


def _widen(weight: np.ndarray) -> np.ndarray:
    return bf16_to_float32(weight) if is_bf16(weight) else weight
