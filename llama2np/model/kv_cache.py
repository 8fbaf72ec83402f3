"""The KV cache: keys and values of every layer for the positions a sequence has seen."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .args import ModelArgs


class KVCache:
    """Keys and values of every layer for the positions already seen: k, v (n_layers, batch,
    n_kv_heads, capacity, head_dim). The capacity grows (``reserve``) as calls reach further, up
    to max_seq_len, doubling."""

    #: positions allocated at first. Small, because a cache's pages are not free until written:
    #: NumPy asks for transparent huge pages on big arrays, so writing the first positions of each
    #: (layer, head) slab made its whole 2 MiB resident (a 7B at 4096 positions: 4 GiB resident
    #: after an 8-token call). Doubling from here costs at most one copy of the filled part.
    INITIAL = 256

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: np.dtype,
                 n_kv_heads: int | None = None):
        """``n_kv_heads``: the key/value heads this process computes (default all; fewer for a
        tensor-parallel slice, see ``Shard``)."""
        self.max_seq_len = max_seq_len
        shape = (args.n_layers, batch_size, n_kv_heads or args.n_kv_heads, min(max_seq_len, self.INITIAL),
                 args.head_dim)
        self.k, self.v = np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype)

    def reserve(self, end: int) -> None:
        """Make room for positions [0, end), end <= max_seq_len."""
        have = self.k.shape[3]
        if end > have:
            shape = (*self.k.shape[:3], min(self.max_seq_len, max(end, 2 * have)), self.k.shape[4])
            k, v = np.zeros(shape, self.k.dtype), np.zeros(shape, self.v.dtype)
            k[:, :, :, :have], v[:, :, :, :have] = self.k, self.v
            self.k, self.v = k, v

    def keep_rows(self, keep: np.ndarray, upto: int) -> "KVCache":
        """A smaller cache holding only the batch rows where ``keep`` (bool, (batch,)) is True.

        Positions < ``upto`` (all that is filled) are copied.
        """
        smaller = object.__new__(KVCache)
        smaller.max_seq_len = self.max_seq_len
        shape = (self.k.shape[0], int(np.count_nonzero(keep)), *self.k.shape[2:])
        smaller.k, smaller.v = np.zeros(shape, self.k.dtype), np.zeros(shape, self.v.dtype)
        smaller.k[:, :, :, :upto] = self.k[:, keep, :, :upto]
        smaller.v[:, :, :, :upto] = self.v[:, keep, :, :upto]
        return smaller

    def add_rows(self, filled: int, other: "KVCache", upto: int) -> "KVCache":
        """A cache holding these rows (positions < ``filled`` copied), then ``other``'s (positions < ``upto``).

        So a sequence prefilled on its own joins a batch of running ones.
        """
        joined = object.__new__(KVCache)
        joined.max_seq_len = max(self.max_seq_len, other.max_seq_len)
        b = self.batch_size
        shape = (self.k.shape[0], b + other.batch_size, self.k.shape[2], max(filled, upto, 1), self.k.shape[4])
        joined.k, joined.v = np.zeros(shape, self.k.dtype), np.zeros(shape, self.v.dtype)
        joined.k[:, :b, :, :filled], joined.v[:, :b, :, :filled] = self.k[:, :, :, :filled], self.v[:, :, :, :filled]
        joined.k[:, b:, :, :upto], joined.v[:, b:, :, :upto] = other.k[:, :, :, :upto], other.v[:, :, :, :upto]
        return joined

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]
