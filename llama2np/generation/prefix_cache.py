"""KV reuse: one sequence's KV cache, remembered with the token ids it holds.

The KV cache is positional: position i holds the keys and values of token i
given tokens 0..i. So for a new sequence that shares its first ``s`` tokens
with the cached one, positions < s are already right and only the rest needs a
forward pass. Positions at and after ``s`` are stale; the next forward writes
over them before anything reads them (attention reads positions < its end),
which is also how rejected draft tokens are rolled back.

Memory: the cache grows with the positions reached (``np.zeros``, so pages
are mapped only as positions fill) and holds 2 x n_layers x n_kv_heads x
head_dim values per cached token: 1 MiB per token for Llama 2 7B in float32,
at most 4 GiB at its 4096-token context. ``all_logits`` (for ``Llama2.logits``)
also keeps vocab_size values per position it returned (125 KiB per token at
32000 in float32).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..model.transformer import Transformer
from ..progress import layer_callback


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0 or list(a[:n]) == list(b[:n]):  # the usual case while decoding, compared at C speed
        return n
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """A single-row KV cache plus the ids whose keys and values it holds."""

    def __init__(self, model: Transformer, max_seq_len: int | None = None):
        self.model = model
        self.cache = model.new_cache(1, max_seq_len or model.args.max_seq_len)
        self.ids: list[int] = []  # tokens whose keys/values positions 0..len-1 hold
        self._logits: np.ndarray | None = None  # (max_seq_len, vocab), for ``all_logits``
        self._n_logits = 0  # positions of self.ids whose logits are in self._logits

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def forward(self, ids: Sequence[int], reuse_upto: int | None = None,
                progress: bool | None = None) -> tuple[int, np.ndarray]:
        """Run the model over ``ids`` past the part already cached: (start, (len(ids) - start, vocab) logits).

        start = the shared prefix, at most len(ids) - 1 (so there are logits for the
        last position) and at most ``reuse_upto``. Row i of the logits is position
        start + i: a caller that wants position p reads row p - start. progress: bars
        on long prefills (see ``progress.enabled``).
        """
        start = min(common_prefix(self.ids, ids), len(ids) - 1)
        if reuse_upto is not None:
            start = min(start, reuse_upto)
        on_layer = None  # a progress bar for long or first prefills only, never for decode / verify steps
        if len(ids) - start > 64 or not self.ids:
            on_layer = layer_callback(self.model.args.n_layers, len(ids) - start, progress)
        # positions >= start are about to change: forget them first, in case the forward is interrupted
        self.ids, self._n_logits = self.ids[:start], min(self._n_logits, start)
        logits = self.model.forward(np.asarray(ids[start:], dtype=np.int64)[None], start, self.cache, on_layer)[0]
        self.ids = [int(t) for t in ids]
        return start, logits

    def all_logits(self, ids: Sequence[int], progress: bool | None = None) -> tuple[int, np.ndarray]:
        """(reused positions, logits of every position of ``ids``: (seq, vocab)), computing only the new ones."""
        start = min(common_prefix(self.ids, ids), self._n_logits)
        if start == len(ids):  # all of it seen before
            return start, self._logits[:start].copy()
        have = 0 if self._logits is None else len(self._logits)
        if len(ids) > have:  # grown as calls reach further (doubling), like the KV cache
            grown = np.zeros((min(self.max_seq_len, max(len(ids), 256, 2 * have)), self.model.args.vocab_size),
                             self.model.dtype)
            if start:
                grown[:start] = self._logits[:start]
            self._logits = grown
        _, new = self.forward(ids, reuse_upto=start, progress=progress)
        self._logits[start:len(ids)] = new
        self._n_logits = len(ids)
        return start, self._logits[:len(ids)].copy()
