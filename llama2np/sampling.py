"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

temperature = 0 is greedy decoding (argmax). Otherwise the logits are divided
by the temperature and soft-maxed; top-k keeps the k most likely tokens; top-p
then keeps, as in Meta's ``sample_top_p``, every token whose preceding
cumulative probability (tokens sorted by probability) is at most p: the
smallest set whose probability exceeds p, never empty. The kept probabilities
are renormalised and one token is drawn per row with that row's
``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_sampling(temperature, top_p, top_k, max_new_tokens=0) -> None:
    """Raise InputError naming the first bad sampling argument."""
    if not _is_number(temperature) or not temperature >= 0 or not np.isfinite(temperature):
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
            or max_new_tokens < 0):
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from: (batch, vocab) logits -> (batch, vocab) probabilities.

    Zero outside the top-k / top-p set, renormalised inside it. Float64, so a
    row's result does not depend on which batch it is in.
    """
    probs = np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / params.temperature))
    order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    if params.top_k is not None:
        sorted_p[:, params.top_k:] = 0.0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
        sorted_p[before > params.top_p] = 0.0  # the most likely token always has before == 0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, sorted_p, axis=-1)
    return out


def sample(logits: np.ndarray, params: SamplingParams, rngs: list[np.random.Generator]) -> np.ndarray:
    """One next token per row: (batch, vocab) logits -> (batch,) int64 ids.

    Each row draws exactly one uniform number from its own generator (none when
    greedy), so a row's tokens are the same whatever else is in the batch.
    """
    logits = np.asarray(logits)
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    probs = filtered_probs(logits, params)
    cdf = np.cumsum(probs, axis=-1)
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]  # (batch,)
    ids = (cdf <= u[:, None]).sum(axis=-1)  # first index whose cdf exceeds u: never a zero-probability one
    for row in np.flatnonzero(ids == logits.shape[-1]):  # u rounded up to the total: take the last kept token
        ids[row] = np.flatnonzero(probs[row])[-1]
    return ids.astype(np.int64)


def make_rngs(seed, batch_size: int) -> list[np.random.Generator]:
    """One generator per row: an int seed gives row i ``default_rng(seed + i)``; a list gives one each.

    So prompt i of a batch samples exactly as it would alone with seed + i.
    """
    if seed is None:
        return [np.random.default_rng() for _ in range(batch_size)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise InputError(f"got {len(seed)} seeds for {batch_size} prompts")
        seeds = list(seed)
    else:
        seeds = [seed + i if _is_int(seed) else seed for i in range(batch_size)]
    for s in seeds:
        if not _is_int(s) or s < 0:
            raise InputError(f"seed must be an integer >= 0 (or None), got {s!r}")
    return [np.random.default_rng(int(s)) for s in seeds]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
