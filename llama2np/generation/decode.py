"""The decode loop: one ``Decoder`` steps every running request, whether one, a batch, or a stream of them.

Requests join with ``add`` and leave when they finish (or are cancelled), between
steps; a step runs

* one forward for every request past its prefill (the ``_Batch``): row b feeds
  its last token at its own position (``Transformer.forward`` with per-row
  positions), so requests that started at different times decode together, as a
  server's continuous batching wants. Finished rows leave the batch's KV cache.
* one forward per newly added request, its whole prompt through a fresh cache
  (``_Prefill``); it gives the first new token, then the request joins the batch.
* one forward per request that decodes alone (``_Single``) through a
  ``PrefixCache``: a single call's request through the model's kept cache (KV
  reuse: a shared prefix is not recomputed), every request when decoding
  speculatively (the step feeds the draft too), and every request on a model
  that runs one start position per forward (tensor parallel).

Each request's next tokens are then chosen (``sampling.sample``, or
``drafting.verify`` for a draft) and appended. Every request has its own random
generator, stopping rule and text decoder, so its tokens are those it would get
alone.

A request reads everything it needs from its own ids at each step: if another
call reused a kept ``PrefixCache`` between two steps, the next step computes
again the positions that call overwrote, and the continuation is unchanged.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from ..model.rope import plain_rope_len
from ..model.transformer import Transformer
from ..progress import layer_callback
from .drafting import Draft, Drafter, verify
from .prefix_cache import PrefixCache
from .request import Completion, Request, Stats
from .sampling import log_softmax, sample

__all__ = ["Completion", "Decoder", "Request", "Stats"]

# What a group's forward hands back: per request that moves, its logits at the positions to
# choose from ((len(draft) + 1, vocab)) and its draft (None when it was not drafting).
Moves = list[tuple[Request, np.ndarray, Draft | None]]


class _Prefill:
    """A request's prompt in one forward through its own fresh cache; then it joins the ``_Batch``."""

    prefill = True

    def __init__(self, model: Transformer, request: Request, progress: bool | None):
        self.model, self.request, self.progress = model, request, progress
        self.cache = model.new_cache(1, min(model.args.max_seq_len, len(request.prompt) + request.max_new_tokens))
        self.done = False

    def forward(self, stats: Stats) -> Moves:
        self.done = True
        r = self.request
        if r.done:
            return []
        stats.prompt_tokens += len(r.prompt)
        on_layer = layer_callback(self.model.args.n_layers, len(r.prompt), self.progress)
        logits = self.model.forward(np.array([r.prompt], dtype=np.int64), 0, self.cache, on_layer)[0, -1:]
        return [(r, logits, None)]  # (1, vocab): the first new token


class _Batch:
    """Every request past its prefill: one forward a step for all of them, each row at its own position.

    Row b of the cache holds request b's positions 0..len(ids) - 2 (its last token is fed
    next). Requests join with their prefilled cache and leave once finished.
    """

    prefill = False

    def __init__(self, model: Transformer):
        self.model = model
        self.requests: list[Request] = []
        self.cache = None

    def _filled(self) -> int:
        return max((len(r.ids) - 1 for r in self.requests), default=0)

    def join(self, request: Request, cache) -> None:
        n = len(request.ids) - 1  # positions its own cache holds
        self.cache = cache if self.cache is None else self.cache.add_rows(self._filled(), cache, n)
        self.requests.append(request)

    def forward(self, stats: Stats) -> Moves:
        keep = np.array([not r.done for r in self.requests], dtype=bool)
        if not keep.all():  # finished rows leave the batch (and the cache)
            if keep.any():
                self.cache = self.cache.keep_rows(keep, self._filled())
            else:
                self.cache = None
            self.requests = [r for r, k in zip(self.requests, keep) if k]
        if not self.requests:
            return []
        tokens = np.array([[r.ids[-1]] for r in self.requests], dtype=np.int64)  # (batch, 1)
        positions = np.array([len(r.ids) - 1 for r in self.requests], dtype=np.int64)  # (batch,)
        logits = self.model.forward(tokens, positions, self.cache)  # (batch, 1, vocab)
        return [(r, logits[b], None) for b, r in enumerate(self.requests)]

    @property
    def done(self) -> bool:
        return all(r.done for r in self.requests)


class _Single:
    """One request through a ``PrefixCache``, with or without a drafter."""

    def __init__(self, request: Request, prefix: PrefixCache, drafter: Drafter | None, num_draft: int,
                 progress: bool | None):
        self.request, self.prefix, self.drafter, self.num_draft = request, prefix, drafter, num_draft
        self.progress = progress
        self.started = False

    @property
    def prefill(self) -> bool:
        return not self.started

    def forward(self, stats: Stats) -> Moves:
        r = self.request
        if r.done:
            return []
        ids = r.ids  # its last token is not in the cache yet
        n = len(ids)
        draft = None
        if self.started and self.drafter is not None:
            # a draft is checked in one pass, which must rotate as one pass per token would: with dynamic
            # RoPE scaling only within the original context (past it, decoding is one token per pass)
            k = min(self.num_draft, r.max_new_tokens - len(r.new_ids) - 1, r.context_len - n - 1,
                    self.prefix.max_seq_len - n, self.drafter.room(n), plain_rope_len(self.prefix.model.args) - n)
            if k > 0:
                draft = self.drafter.propose(ids, k, r.config, r.rng, r.prompt, r.new_ids)
        fed = ids + (draft.ids if draft else [])
        start, logits = self.prefix.forward(fed, reuse_upto=n - 1 if self.started else None,
                                            progress=self.progress, prompt_len=len(r.prompt))
        if not self.started:
            stats.prompt_tokens += n - start
            stats.cached_tokens += start
        else:
            stats.recomputed_tokens += n - 1 - start  # > 0 only if another call reused the cache meanwhile
        self.started = True
        return [(r, logits[n - 1 - start:], draft)]  # the positions from ids' last token on

    @property
    def done(self) -> bool:
        return self.request.done


class Decoder:
    """Steps every running request: ``add`` requests, ``step`` until ``running`` is empty.

    drafter / num_draft: speculative decoding for every request added (each then
    decodes alone). ``stats`` accumulates over every step. add and step may be
    called from different threads; each takes the decoder's lock.
    """

    def __init__(self, model: Transformer, drafter: Drafter | None = None, num_draft: int = 0,
                 progress: bool | None = None, stats: Stats | None = None):
        self.model, self.drafter, self.num_draft, self.progress = model, drafter, num_draft, progress
        self.stats = stats if stats is not None else Stats()
        self._batch = _Batch(model)
        self._groups: list = []  # prefills waiting for the next step, and single requests
        self._lock = threading.Lock()

    def add(self, requests: list[Request], prefix: PrefixCache | None = None) -> None:
        """Requests that start at the next step.

        prefix: the KV cache a single request decodes through (KV reuse: it leaves its own
        keys and values behind there). Otherwise a request is prefilled on its own and then
        decodes in the batch; when drafting, or on a model that runs one start position per
        forward, each request decodes alone through a fresh ``PrefixCache``.
        """
        requests = [r for r in requests if not r.done]
        if not requests:
            return
        alone = self.drafter is not None or not getattr(self.model, "rows_at_own_positions", False)
        with self._lock:
            for r in requests:
                if prefix is not None and len(requests) == 1:
                    self._groups.append(_Single(r, prefix, self.drafter, self.num_draft, self.progress))
                elif alone:
                    cache = PrefixCache(self.model, min(self.model.args.max_seq_len, len(r.prompt) + r.max_new_tokens))
                    self._groups.append(_Single(r, cache, self.drafter, self.num_draft, self.progress))
                else:
                    self._groups.append(_Prefill(self.model, r, self.progress))

    @property
    def running(self) -> list[Request]:
        """The requests not finished yet."""
        with self._lock:
            return [r for g in [self._batch, *self._groups] for r in self._requests(g) if not r.done]

    @staticmethod
    def _requests(group) -> list[Request]:
        return group.requests if isinstance(group, _Batch) else [group.request]

    def step(self) -> list[tuple[Request, str]]:
        """One forward for the batch, one per new or single request; (request, newly printable text) per mover."""
        with self._lock:
            events = []
            for group in [self._batch, *self._groups]:
                events += self._step_group(group)
                if isinstance(group, _Prefill) and not group.request.done:
                    self._batch.join(group.request, group.cache)
            self._groups = [g for g in self._groups if not g.done]
            return events

    def _step_group(self, group) -> list[tuple[Request, str]]:
        stats = self.stats
        t0 = time.perf_counter()
        prefill = group.prefill
        moves = group.forward(stats)
        if not moves:
            return []
        stats.forward_passes += 1
        by_config: dict[int, list[tuple[Request, np.ndarray]]] = {}
        for r, logits, draft in moves:
            if draft is None:
                by_config.setdefault(id(r.config), []).append((r, logits))
        chosen: dict[int, list[int]] = {}
        for rows in by_config.values():  # one call for all the rows without a draft that share options
            next_ids = sample(np.stack([logits[-1] for _, logits in rows]), rows[0][0].config,
                              [r.rng for r, _ in rows], [(r.prompt, r.new_ids) for r, _ in rows])
            chosen.update({id(r): [int(t)] for (r, _), t in zip(rows, next_ids)})
        events = []
        made = 0
        for r, logits, draft in moves:
            if draft is not None:
                verdict = verify(logits, draft, r.config, r.rng, r.prompt, r.new_ids)
                tokens = verdict.tokens
                stats.drafted += len(draft.ids)
                stats.accepted += verdict.accepted
            else:
                tokens = chosen[id(r)]
            text = ""
            for j, token in enumerate(tokens):
                lp = float(log_softmax(logits[j])[token]) if r.logprobs is not None else None
                text += r.push(token, lp)
                made += 1
                if r.done:
                    break
            events.append((r, text))
        elapsed = time.perf_counter() - t0
        stats.new_tokens += made
        if prefill:
            stats.prompt_seconds += elapsed
        else:
            stats.new_seconds += elapsed
            stats.decode_steps += made
        return events

    def run(self, on_step: Callable[[list[tuple[Request, str]]], None] | None = None) -> None:
        """Step until every request has finished."""
        while self.running:
            events = self.step()
            if on_step is not None:
                on_step(events)
