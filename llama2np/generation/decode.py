"""The decode loop: one ``Decoder`` steps every running request, a request at a time or a batch.

Requests join with ``add`` and leave when they finish (or are cancelled), between
steps. Requests added together form a group that shares one KV cache:

* several without a drafter go in lockstep, as Meta's ``Llama.generate``: the
  first forward prefills every row up to the shortest prompt, each later one
  feeds one position for the whole group; a row still inside its (longer)
  prompt keeps its prompt token instead of the sampled one. Rows that finish
  are dropped from the group's cache so they cost nothing more.
* one alone, or each one when decoding speculatively, goes through a
  ``PrefixCache`` (for a single call the model's kept one, so a shared prefix
  is not recomputed). A step feeds the tokens the cache lacks, plus the draft.

``step`` runs one forward per group, chooses each request's next tokens
(``sampling.sample``, or ``drafting.verify`` for a draft) and appends them.
Every request has its own random generator, stopping rule and text decoder, so
its tokens are those it would get alone. A group holds the positions of its own
requests only; the KV cache of a group that joins later cannot be merged into
a running batch, since the model runs one start position per forward.

A request reads everything it needs from its own ids at each step: if another
call reused a kept ``PrefixCache`` between two steps, the next step computes
again the positions that call overwrote, and the continuation is unchanged.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

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


class _Lockstep:
    """Requests that share one (batch, ...) KV cache and advance one position a step together."""

    def __init__(self, model: Transformer, requests: list[Request], progress: bool | None):
        self.model, self.requests, self.progress = model, list(requests), progress
        self.lens = np.array([len(r.prompt) for r in requests])
        total = min(model.args.max_seq_len, max(len(r.prompt) + r.max_new_tokens for r in requests))
        self.cache = model.new_cache(len(requests), total)
        self.pos = 0  # positions every row's cache holds

    def forward(self, stats: Stats) -> Moves:
        keep = np.array([not r.done for r in self.requests])
        if not keep.all():  # finished rows leave the batch (and the cache)
            self.cache = self.cache.keep_rows(keep, self.pos)
            self.requests = [r for r, k in zip(self.requests, keep) if k]
            self.lens = self.lens[keep]
        if not self.requests:
            return []
        end = int(self.lens.min()) if self.pos == 0 else self.pos + 1
        tokens = np.array([r.ids[self.pos:end] for r in self.requests], dtype=np.int64)  # (batch, end - pos)
        on_layer = None
        if self.pos == 0:  # a bar for the prefill only
            stats.prompt_tokens += int(self.lens.sum())
            on_layer = layer_callback(self.model.args.n_layers, tokens.size, self.progress)
        logits = self.model.forward(tokens, self.pos, self.cache, on_layer)[:, -1:]  # (batch, 1, vocab)
        self.pos = end
        return [(r, logits[i], None) for i, r in enumerate(self.requests) if self.lens[i] <= end]

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

    def forward(self, stats: Stats) -> Moves:
        r = self.request
        if r.done:
            return []
        ids = r.ids  # its last token is not in the cache yet
        n = len(ids)
        draft = None
        if self.started and self.drafter is not None:
            k = min(self.num_draft, r.max_new_tokens - len(r.new_ids) - 1, r.context_len - n - 1,
                    self.prefix.max_seq_len - n, self.drafter.room(n))
            if k > 0:
                draft = self.drafter.propose(ids, k, r.config, r.rng, r.prompt, r.new_ids)
        fed = ids + (draft.ids if draft else [])
        start, logits = self.prefix.forward(fed, reuse_upto=n - 1 if self.started else None,
                                            progress=self.progress)
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
        self._groups: list[_Lockstep | _Single] = []
        self._first: set[int] = set()  # groups whose next forward is their prefill
        self._lock = threading.Lock()

    def add(self, requests: list[Request], prefix: PrefixCache | None = None) -> None:
        """Requests that start together (in lockstep when several and not drafting).

        prefix: the KV cache a single request decodes through (KV reuse); else each
        request alone gets a fresh one.
        """
        requests = [r for r in requests if not r.done]
        if not requests:
            return
        with self._lock:
            if len(requests) > 1 and self.drafter is None:
                groups = [_Lockstep(self.model, requests, self.progress)]
            else:
                groups = []
                for r in requests:
                    cache = prefix if prefix is not None and len(requests) == 1 else PrefixCache(
                        self.model, min(self.model.args.max_seq_len, len(r.prompt) + r.max_new_tokens))
                    groups.append(_Single(r, cache, self.drafter, self.num_draft, self.progress))
            self._groups += groups
            self._first |= {id(g) for g in groups}

    @property
    def running(self) -> list[Request]:
        """The requests not finished yet."""
        with self._lock:
            return [r for g in self._groups for r in self._requests(g) if not r.done]

    @staticmethod
    def _requests(group) -> list[Request]:
        return group.requests if isinstance(group, _Lockstep) else [group.request]

    def step(self) -> list[tuple[Request, str]]:
        """One forward per group; returns (request, newly printable text) for each request that moved."""
        with self._lock:
            events = []
            for group in self._groups:
                events += self._step_group(group)
            self._groups = [g for g in self._groups if not g.done]
            return events

    def _step_group(self, group) -> list[tuple[Request, str]]:
        stats = self.stats
        t0 = time.perf_counter()
        prefill = id(group) in self._first
        self._first.discard(id(group))
        moves = group.forward(stats)
        if not moves and group.done:
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
