"""Decoding one sequence, checking drafted tokens: prompt lookup and draft models (speculative decoding).

A step proposes up to K tokens cheaply, then the model scores all of them in one
forward pass over K + 1 positions through the KV cache (Leviathan et al. 2023,
Chen et al. 2023). Draft token j is accepted, left to right:

* greedy: when it is the argmax of the model's (processed) logits at its
  position, so the output is exactly plain greedy decoding's;
* sampling: with probability min(1, p(x) / q(x)), p the model's distribution
  and q the drafter's (both after the same processors and temperature / top-k /
  top-p / min-p). At the first rejection the token is drawn from the normalised
  max(0, p - q) instead, and the rest of the draft is dropped. A prompt-lookup
  draft is a point mass (q(x) = 1). The output distribution is the model's.

Every step then yields one more token than it accepted: the correction, or
after a fully accepted draft the model's own next token (the pass computed its
logits anyway). Rejected positions stay in the cache as stale entries that the
next pass overwrites (see ``prefix_cache``). With no drafter every step is one
position: plain decoding.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from ..checks import is_int
from ..errors import InputError
from ..model.transformer import Transformer
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, draw, filtered_probs, log_softmax, process_logits

# 3 drafts = a pass over 4 positions, which costs what a pass over one costs for 7B bf16 on a
# 2-core machine (scripts/bench/bench.py --speculative positions); 8 positions cost 2.4 times as much.
DEFAULT_NUM_DRAFT = 3


class PromptLookup:
    """Drafts by copying: find the latest earlier occurrence of the last n tokens (n = N..1), propose what followed."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def room(self, n: int) -> int:
        return n  # no limit of its own

    def propose(self, ids: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator,
                prompt: Sequence[int], new_ids: Sequence[int]) -> tuple[list[int], np.ndarray | None]:
        """Up to k draft ids after ``ids``, and None for q: a copied token is a point mass."""
        seq = np.asarray(ids, dtype=np.int64)
        ends = np.flatnonzero(seq[:-1] == seq[-1])  # earlier occurrences of the last token
        if ends.size == 0:
            return [], None
        # how far back (up to max_ngram) each occurrence matches the sequence's end
        matched = np.ones(ends.size, dtype=np.int64)
        alive = np.ones(ends.size, dtype=bool)
        for back in range(1, min(self.max_ngram, len(seq) - 1)):
            before = ends - back
            alive &= before >= 0
            alive[alive] = seq[before[alive]] == seq[-1 - back]
            matched += alive
        at = int(ends[np.flatnonzero(matched == matched.max())[-1]]) + 1  # longest match, latest of those
        return seq[at:at + k].tolist(), None


class DraftModel:
    """Drafts with a smaller model sharing the vocabulary, k one-position steps through its own KV cache."""

    def __init__(self, model: Transformer, prefix: PrefixCache | None = None):
        self.model = model
        self.prefix = prefix or PrefixCache(model)

    def room(self, n: int) -> int:
        return self.prefix.max_seq_len - n + 1  # the last draft token is never fed to the draft model

    def propose(self, ids, k, params, rng, prompt, new_ids):
        """k draft ids and, when sampling, q: the (k, vocab) distributions they were drawn from."""
        draft, qs = [], []
        for _ in range(k):
            seq = list(ids) + draft
            _, logits = self.prefix.forward(seq)
            z = process_logits(logits[-1:], params, [(prompt, list(new_ids) + draft)])  # (1, vocab)
            if params.greedy:
                draft.append(int(np.argmax(z[0])))
            else:
                q = filtered_probs(z, params)  # (1, vocab)
                draft.append(int(draw(q, [rng])[0]))
                qs.append(q[0])
        return draft, (np.stack(qs) if qs else None)


def make_drafter(prompt_lookup: int | None, draft_model: Transformer | None, num_draft: int | None,
                 target: Transformer, draft_prefix: PrefixCache | None = None):
    """(drafter or None, K) from generate's arguments, or InputError naming the bad one."""
    if prompt_lookup is not None and (not is_int(prompt_lookup) or prompt_lookup < 1):
        raise InputError(f"prompt_lookup must be an n-gram length >= 1 (or None), got {prompt_lookup!r}")
    if num_draft is not None and (not is_int(num_draft) or num_draft < 1):
        raise InputError(f"num_draft must be an integer >= 1, got {num_draft!r}")
    if prompt_lookup is not None and draft_model is not None:
        raise InputError("choose one drafter: prompt_lookup or draft_model, not both")
    if draft_model is not None:
        if draft_model.args.vocab_size != target.args.vocab_size:
            raise InputError(f"the draft model's vocabulary ({draft_model.args.vocab_size} tokens) differs from "
                             f"the model's ({target.args.vocab_size}): a draft model must share the tokenizer")
        return DraftModel(draft_model, draft_prefix), int(num_draft or DEFAULT_NUM_DRAFT)
    if prompt_lookup is not None:
        return PromptLookup(int(prompt_lookup)), int(num_draft or DEFAULT_NUM_DRAFT)
    if num_draft is not None:
        raise InputError("num_draft needs a drafter: prompt_lookup=N or draft_model=...")
    return None, 0


def decode_row(row, params: SamplingParams, rng: np.random.Generator, stats, prefix: PrefixCache,
               drafter=None, num_draft: int = 0) -> Iterator[list[tuple[int, str]]]:
    """Generate for one ``generation._Row`` through ``prefix``; after each pass yield [(0, new text)]."""
    if row.done:
        return
    ids = list(row.prompt)
    t0 = time.perf_counter()
    start, logits = prefix.forward(ids)  # the prompt past what the cache already holds
    stats.prompt_tokens += len(ids) - start
    stats.cached_tokens += start
    stats.forward_passes += 1
    text, _, made = _emit(row, params, rng, logits[-1:], [], None)
    stats.new_tokens += made
    stats.prompt_seconds += time.perf_counter() - t0
    yield [(0, text)]
    while not row.done:
        t0 = time.perf_counter()
        ids = row.prompt + row.new_ids  # its last token is not in the cache yet
        n = len(ids)
        k = min(num_draft, row.max_new_tokens - len(row.new_ids) - 1, row.context_len - n - 1,
                prefix.max_seq_len - n)
        draft, q = [], None
        if drafter is not None and k > 0:
            draft, q = drafter.propose(ids, min(k, drafter.room(n)), params, rng, row.prompt, row.new_ids)
        _, logits = prefix.forward(ids + draft, reuse_upto=n - 1)  # (len(draft) + 1, vocab)
        text, accepted, made = _emit(row, params, rng, logits, draft, q)
        stats.forward_passes += 1
        stats.drafted += len(draft)
        stats.accepted += accepted
        stats.new_tokens += made
        stats.decode_steps += made
        stats.new_seconds += time.perf_counter() - t0
        yield [(0, text)]


def accept(p_x: float, q_x: float, rng: np.random.Generator) -> bool:
    """Keep a draft token with probability min(1, p(x) / q(x)) (one uniform number)."""
    return bool(rng.random() * q_x < p_x)


def _emit(row, params: SamplingParams, rng: np.random.Generator, logits: np.ndarray, draft: list[int],
          q: np.ndarray | None) -> tuple[str, int, int]:
    """Accept draft tokens against (len(draft) + 1, vocab) logits, then one more; push them into ``row``.

    Returns (printable text, draft tokens accepted, tokens pushed).
    """
    text, n_accepted = "", 0
    for j in range(len(logits)):
        z = process_logits(logits[j:j + 1], params, [(row.prompt, row.new_ids)])  # (1, vocab)
        if params.greedy:
            token = int(np.argmax(z[0]))
            accepted = bool(j < len(draft) and token == draft[j])
        else:
            p = filtered_probs(z, params)[0]  # (vocab,)
            accepted = False
            if j < len(draft):
                x = draft[j]
                qx = 1.0 if q is None else q[j, x]
                accepted = accept(p[x], qx, rng)
                if not accepted:  # draw from max(0, p - q), renormalised
                    residual = p.copy()
                    if q is None:
                        residual[x] = 0.0
                    else:
                        residual = np.maximum(residual - q[j], 0.0)
                    p = residual / residual.sum() if residual.sum() > 0 else p
            token = x if accepted else int(draw(p[None], [rng])[0])
        lp = float(log_softmax(logits[j])[token]) if row.logprobs is not None else None
        text += row.push(token, lp)
        n_accepted += accepted
        if row.done or not accepted:
            break
    return text, n_accepted, j + 1
