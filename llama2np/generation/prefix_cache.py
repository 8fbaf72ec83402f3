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

Dynamic RoPE scaling (``model.rope``): past the original context a key's rotation
depends on the forward pass that computed it, so a position is reused only when
its ids match and its key was rotated as a fresh computation of the new sequence
would rotate it. That computation is generation's, as Hugging Face runs it with
its KV cache: the first ``prompt_len`` positions in one pass, each later position
in a pass of its own (a decode step); ``Llama2.logits`` is one pass over all. When
positions must be computed again (another call overwrote them), they are computed
in those same passes, so the logits are those of an uninterrupted run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..model.rope import plain_rope_len, rope_end_key
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
        # dynamic RoPE scaling: rope_end_key of the pass that computed each cached position (else not tracked)
        self._keys: list[int] | None = [] if model.args.rope_scaling == "dynamic" else None

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def forward(self, ids: Sequence[int], reuse_upto: int | None = None,
                progress: bool | None = None, prompt_len: int | None = None) -> tuple[int, np.ndarray]:
        """Run the model over ``ids`` past the part already cached: (start, (len(ids) - start, vocab) logits).

        start = the shared prefix, at most len(ids) - 1 (so there are logits for the
        last position) and at most ``reuse_upto``. Row i of the logits is position
        start + i: a caller that wants position p reads row p - start. progress: bars
        on long prefills (see ``progress.enabled``). prompt_len: ``ids`` are a prompt of
        this many tokens and the tokens generated after it (default: all a prompt), which
        decides their RoPE rotation under dynamic scaling (see the module's docstring).
        """
        n = len(ids)
        prompt_len = n if prompt_len is None else min(prompt_len, n)
        start = min(self._reusable(ids, prompt_len), n - 1)
        if reuse_upto is not None:
            start = min(start, reuse_upto)
        on_layer = None  # a progress bar for long or first prefills only, never for decode / verify steps
        if n - start > 64 or not self.ids:
            on_layer = layer_callback(self.model.args.n_layers, n - start, progress)
        # positions >= start are about to change: forget them first, in case the forward is interrupted
        self._forget(start)
        logits = []
        for a, b in self._passes(start, n, prompt_len):
            tokens = np.asarray(ids[a:b], dtype=np.int64)[None]
            logits.append(self.model.forward(tokens, a, self.cache, on_layer)[0])
            on_layer = None
            self.ids = self.ids + [int(t) for t in ids[a:b]]
            if self._keys is not None:
                self._keys += [rope_end_key(self.model.args, b)] * (b - a)
        return start, logits[0] if len(logits) == 1 else np.concatenate(logits)

    def _forget(self, start: int) -> None:
        self.ids, self._n_logits = self.ids[:start], min(self._n_logits, start)
        if self._keys is not None:
            self._keys = self._keys[:start]

    def _reusable(self, ids: Sequence[int], prompt_len: int) -> int:
        """How many leading cached positions hold what ``ids`` need: their ids, and (dynamic RoPE
        scaling) keys rotated as generation computes them (see the module's docstring)."""
        start = common_prefix(self.ids, ids)
        if self._keys is None or start == 0:
            return start
        args = self.model.args
        wanted = [rope_end_key(args, prompt_len)] * min(prompt_len, start)
        wanted += [rope_end_key(args, p + 1) for p in range(prompt_len, start)]
        return common_prefix(self._keys[:start], wanted)

    def _passes(self, start: int, n: int, prompt_len: int) -> list[tuple[int, int]]:
        """The forward passes, [a, b) each, that compute positions [start, n) as generation does.

        A pass ending within the fixed-frequency length rotates like any other such pass,
        so those positions go in one; past it (dynamic RoPE scaling), the prompt's
        positions in one pass ending at ``prompt_len``, then one pass per position.
        """
        plain = plain_rope_len(self.model.args)
        if n <= plain:
            return [(start, n)]
        passes, a = [], start
        first_scaled = 0 if prompt_len > plain else plain  # the first position whose pass ends past ``plain``
        if a < first_scaled:
            passes.append((a, first_scaled))
            a = first_scaled
        if a < prompt_len:
            passes.append((a, prompt_len))
            a = prompt_len
        return passes + [(p, p + 1) for p in range(a, n)]

    def all_logits(self, ids: Sequence[int], progress: bool | None = None) -> tuple[int, np.ndarray]:
        """(reused positions, logits of every position of ``ids``: (seq, vocab)), computing only the new ones."""
        start = min(self._reusable(ids, len(ids)), self._n_logits)
        if start == len(ids):  # all of it seen before
            return start, self._logits[:start].copy()
        have = 0 if self._logits is None else len(self._logits)
        if len(ids) > have:  # grown as calls reach further (doubling), like the KV cache
            grown = np.zeros((min(self.max_seq_len, max(len(ids), 256, 2 * have)), self.model.args.vocab_size),
                             self.model.dtype)
            if start:
                grown[:start] = self._logits[:start]
            self._logits = grown
        start, new = self.forward(ids, reuse_upto=start, progress=progress)
        self._logits[start:len(ids)] = new
        self._n_logits = len(ids)
        return start, self._logits[:len(ids)].copy()
