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
next pass overwrites (see ``prefix_cache``).

The interface: a drafter's ``propose`` returns a ``Draft``; ``verify`` returns a
``Verdict``, the tokens to append. The decode loop (``decode.Decoder``) owns the
cache, the request and the stats; nothing here changes them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import InputError
from ..model.transformer import Transformer
from .config import GenerationConfig
from .prefix_cache import PrefixCache
from .sampling import draw, filtered_probs, greedy, process_scores

# 3 drafts = a pass over 4 positions, which costs what a pass over one costs for 7B bf16 on a
# 2-core machine (scripts/bench/bench.py --speculative positions); 8 positions cost 2.4 times as much.
DEFAULT_NUM_DRAFT = 3


class Draft(NamedTuple):
    """Proposed next tokens, and for a sampled draft the distributions they were drawn from."""

    ids: list[int]
    q: np.ndarray | None  # (len(ids), vocab), or None: each token a point mass (q(x) = 1)


class Verdict(NamedTuple):
    """What the model's check of a draft gives: the tokens to append, and how many were drafts."""

    tokens: list[int]  # accepted draft tokens, then one more (the correction or the model's next)
    accepted: int


class Drafter(Protocol):
    def room(self, n: int) -> int:
        """How many tokens it can still draft after a sequence of n."""

    def propose(self, ids: Sequence[int], k: int, config: GenerationConfig, rng: np.random.Generator,
                prompt: Sequence[int], new_ids: Sequence[int]) -> Draft:
        """Up to k tokens to follow ``ids`` (= prompt + new_ids)."""


class PromptLookup:
    """Drafts by copying: find the latest earlier occurrence of the last n tokens (n = N..1), propose what followed."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def room(self, n: int) -> int:
        return n  # no limit of its own

    def propose(self, ids, k, config, rng, prompt, new_ids) -> Draft:
        """Up to k draft ids after ``ids``, and None for q: a copied token is a point mass."""
        seq = np.asarray(ids, dtype=np.int64)
        ends = np.flatnonzero(seq[:-1] == seq[-1])  # earlier occurrences of the last token
        if ends.size == 0:
            return Draft([], None)
        # how far back (up to max_ngram) each occurrence matches the sequence's end
        matched = np.ones(ends.size, dtype=np.int64)
        alive = np.ones(ends.size, dtype=bool)
        for back in range(1, min(self.max_ngram, len(seq) - 1)):
            before = ends - back
            alive &= before >= 0
            alive[alive] = seq[before[alive]] == seq[-1 - back]
            matched += alive
        at = int(ends[np.flatnonzero(matched == matched.max())[-1]]) + 1  # longest match, latest of those
        return Draft(seq[at:at + k].tolist(), None)


class DraftModel:
    """Drafts with a smaller model sharing the vocabulary, k one-position steps through its own KV cache."""

    def __init__(self, model: Transformer, prefix: PrefixCache | None = None):
        self.model = model
        self.prefix = prefix or PrefixCache(model)

    def room(self, n: int) -> int:
        return self.prefix.max_seq_len - n + 1  # the last draft token is never fed to the draft model

    def propose(self, ids, k, config, rng, prompt, new_ids) -> Draft:
        """k draft ids and, when sampling, q: the (k, vocab) distributions they were drawn from."""
        draft, qs = [], []
        for _ in range(k):
            # the last position's logits are the last row; the draft model's own RoPE as in its generation
            _, logits = self.prefix.forward(list(ids) + draft, prompt_len=len(prompt))
            x, e = process_scores(logits[-1:], config, [(prompt, list(new_ids) + draft)])  # (1, vocab)
            if config.greedy:
                draft.append(int(greedy(x)[0]))
            else:
                q = filtered_probs(x, config, e)  # (1, vocab)
                draft.append(int(draw(q, [rng])[0]))
                qs.append(q[0])
        return Draft(draft, np.stack(qs) if qs else None)


def make_drafter(config: GenerationConfig, draft_model: Transformer | None, target: Transformer,
                 draft_prefix: PrefixCache | None = None) -> tuple[Drafter | None, int]:
    """(drafter or None, K) from the options and the draft model, or InputError naming the bad one."""
    prompt_lookup, num_draft = config.prompt_lookup, config.num_draft
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


def accept(p_x: float, q_x: float, rng: np.random.Generator) -> bool:
    """Keep a draft token with probability min(1, p(x) / q(x)) (one uniform number)."""
    return bool(rng.random() * q_x < p_x)


def verify(logits: np.ndarray, draft: Draft, config: GenerationConfig, rng: np.random.Generator,
           prompt: Sequence[int], new_ids: Sequence[int]) -> Verdict:
    """Check a draft against the model's (len(draft) + 1, vocab) logits at its positions, left to right.

    Position j's logits are processed with new_ids + draft[:j] as the tokens so far. An
    empty draft gives one token chosen as plain decoding chooses it.
    """
    tokens: list[int] = []
    for j in range(len(draft.ids) + 1):
        x, e = process_scores(logits[j:j + 1], config, [(prompt, list(new_ids) + tokens)])  # (1, vocab)
        accepted = False
        if config.greedy:
            token = int(greedy(x)[0])
            accepted = j < len(draft.ids) and token == draft.ids[j]
        else:
            p = filtered_probs(x, config, e)[0]  # (vocab,)
            if j < len(draft.ids):
                token = draft.ids[j]
                accepted = accept(p[token], 1.0 if draft.q is None else draft.q[j, token], rng)
                if not accepted:  # draw from max(0, p - q), renormalised
                    residual = p.copy()
                    if draft.q is None:
                        residual[token] = 0.0
                    else:
                        residual = np.maximum(residual - draft.q[j], 0.0)
                    p = residual / residual.sum() if residual.sum() > 0 else p
            if not accepted:
                token = int(draw(p[None], [rng])[0])
        tokens.append(token)
        if not accepted:
            break
    return Verdict(tokens, len(tokens) - 1)  # the last token is never an accepted draft token
