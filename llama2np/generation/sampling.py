"""Choosing the next token from logits: logits processors, then greedy or temperature, top-k, top-p, min-p.

In Hugging Face transformers' order (``GenerationMixin._get_logits_processor``),
the logits first go through the processors that see the tokens so far:

    logit_bias          add a fixed amount to chosen token ids (HF's sequence_bias for one-token keys)
    repetition_penalty  every token already in prompt + output: logit / penalty if > 0, else * penalty
    frequency_penalty   OpenAI's: logit -= frequency_penalty * (times the token was generated so far)
    presence_penalty        and    -= presence_penalty * (1 if it was generated at all)

(frequency and presence count the new tokens only, as OpenAI's and vLLM's do;
HF has no such processor). temperature = 0 is then greedy decoding (argmax).
Otherwise the logits are divided by the temperature and soft-maxed; top-k
keeps the k most likely tokens; top-p then keeps, as in Meta's
``sample_top_p``, every token whose preceding cumulative probability (tokens
sorted by probability) is at most p: the smallest set whose probability
exceeds p, never empty; min-p drops every token less likely than min_p times
the likeliest one. The kept probabilities are renormalised and one token is
drawn per row with that row's ``numpy.random.Generator``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, InputError


# --- logits processors: (batch, vocab) logits + each row's tokens so far -> adjusted logits -----


# --- logits processors ------------------------------------------------------------------
#
# A processor maps (batch, vocab) scores and each row's tokens so far to new scores. The
# scores are kept as x * 2**e, x float64 and e one integer exponent per row, so no formula
# overflows: a repetition_penalty of 1e-320 divides logits into the 1e320s, a frequency_penalty
# of -1e308 adds 2e308 to a twice-seen token. Where a result would pass float64's range, the
# row's x is halved as often as needed first (e grows); the tokens that matter then are the
# huge ones, and the small ones lose only precision nobody can see once those are exponentiated.
# Softmax, argmax and the filters below use x and e exactly (``filtered_probs``).

_TOP = 1020  # largest log2 |x| a step may produce (float64 reaches 2**1024), with room for one addition


def _log2_abs(a: np.ndarray) -> np.ndarray:
    """log2 |a| for finite entries, -inf elsewhere (0, and -inf bans, bound nothing)."""
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(a), np.log2(np.abs(a)), -np.inf)


def _make_room(x: np.ndarray, e: np.ndarray, log2_bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Halve rows (x *= 2**-k, e += k) so that results of per-row size 2**log2_bound fit float64."""
    k = np.where(np.isfinite(log2_bound), np.ceil(log2_bound) - _TOP, 0).clip(0).astype(np.int64)  # (batch,)
    if k.any():
        x = np.ldexp(x, -k[:, None])
        e = e + k
    return x, e


class LogitBias:
    """Add a fixed amount to chosen tokens' logits (-inf bans a token)."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = np.array(list(bias), dtype=np.int64)
        self.values = np.array(list(bias.values()), dtype=np.float64)

    def __call__(self, x, e, seen, new):
        bound = np.maximum(_log2_abs(x[:, self.ids]).max(-1), _log2_abs(self.values).max() - e) + 1
        x, e = _make_room(x, e, bound)
        x[:, self.ids] += np.ldexp(self.values[None], -e[:, None])
        return x, e


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al. 2019), as HF applies it: each token in prompt + output, once."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, x, e, seen, new):
        spread = abs(np.log2(self.penalty))  # x / penalty or x * penalty grows |x| by at most this
        ids = [np.unique(s) for s in seen]
        bound = np.array([_log2_abs(x[row, i]).max(initial=-np.inf) for row, i in enumerate(ids)]) + spread
        x, e = _make_room(x, e, bound)
        for row, i in enumerate(ids):
            v = x[row, i]
            x[row, i] = np.where(v < 0, v * self.penalty, v / self.penalty)
        return x, e


class FrequencyPresencePenalty:
    """OpenAI's penalties: subtract frequency * count + presence * (count > 0), counting new tokens."""

    def __init__(self, frequency: float, presence: float):
        self.frequency, self.presence = frequency, presence

    def __call__(self, x, e, seen, new):
        counts = np.stack([np.bincount(np.asarray(n, dtype=np.int64), minlength=x.shape[-1]) for n in new])
        most = counts.max(-1)  # (batch,)
        with np.errstate(divide="ignore"):
            amount = np.logaddexp2(_log2_abs(np.float64(self.frequency)) + np.log2(np.maximum(most, 1)),
                                   _log2_abs(np.float64(self.presence))) + 1
        bound = np.where(most > 0, np.maximum(_log2_abs(x).max(-1), amount - e), -np.inf) + 1
        x, e = _make_room(x, e, bound)
        f, p = np.ldexp(self.frequency, -e)[:, None], np.ldexp(self.presence, -e)[:, None]
        x -= f * counts + p * (counts > 0)
        return x, e


def logits_processors(config) -> list:
    """The processors ``config`` asks for, in HF's order (an empty list when none)."""
    procs = []
    if config.logit_bias:
        procs.append(LogitBias(config.logit_bias))
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(float(config.repetition_penalty)))
    if config.frequency_penalty or config.presence_penalty:
        procs.append(FrequencyPresencePenalty(float(config.frequency_penalty), float(config.presence_penalty)))
    return procs


def process_scores(logits: np.ndarray, config,
                   contexts: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``config``'s processors: (batch, vocab) logits -> (x (batch, vocab), e (batch,)), scores x * 2**e.

    contexts: per row, (prompt ids, new ids so far). Without processors x is the
    logits themselves (not copied, not widened) and e is 0. Logits that are not
    finite (the model's numbers broke) are a ``CheckpointError``: no parameter can mend them.
    """
    logits = np.asarray(logits)
    if not np.isfinite(logits).all():
        raise CheckpointError("the model's logits hold NaN or inf (its weights, or the compute dtype, "
                              "overflowed); nothing can be sampled from them")
    e = np.zeros(len(logits), dtype=np.int64)
    procs = logits_processors(config)
    if not procs:
        return logits, e
    if contexts is None or len(contexts) != len(logits):
        raise ValueError("the penalties need each row's (prompt ids, new ids)")
    new = [np.asarray(n, dtype=np.int64) for _, n in contexts]
    seen = [np.concatenate([np.asarray(p, dtype=np.int64), n]) for (p, _), n in zip(contexts, new)]
    x = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay as they were
    for proc in procs:
        x, e = proc(x, e, seen, new)
    return x, e


def process_logits(logits: np.ndarray, config,
                   contexts: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> np.ndarray:
    """The processed logits as plain numbers (beyond float64's range they print as +-inf)."""
    x, e = process_scores(logits, config, contexts)
    if not e.any():
        return x
    with np.errstate(over="ignore"):
        return np.ldexp(x, e[:, None])


def greedy(x: np.ndarray) -> np.ndarray:
    """argmax of processed scores (the first of equals), (batch, vocab) -> (batch,); InputError if all banned."""
    _check_not_all_banned(x)
    return np.argmax(x, axis=-1).astype(np.int64)


def _check_not_all_banned(x: np.ndarray) -> None:
    if (x.max(axis=-1) == -np.inf).any():
        raise InputError("logit_bias bans every token (-inf on all of them): there is nothing to choose from")

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, config, exponent: np.ndarray | None = None) -> np.ndarray:
    """The distribution sampling draws from: (batch, vocab) scores -> (batch, vocab) probabilities.

    softmax(logits * 2**exponent / temperature), zero outside the top-k / top-p /
    min-p set and renormalised inside it; float64, so a row's result does not
    depend on which batch it is in. The scores are those of ``process_scores``
    (exponent None: 0). The likeliest score is subtracted before anything is
    scaled, so no step overflows: a temperature so small that logits / temperature
    passes float64's range leaves the likeliest tokens, equally likely (greedy's
    limit), and every other probability is exactly 0. Every row sums to 1.
    """
    x = np.asarray(logits, dtype=np.float64)
    _check_not_all_banned(x)
    with np.errstate(over="ignore", under="ignore"):
        z = (x - x.max(axis=-1, keepdims=True)) / config.temperature  # <= 0; 0 at the likeliest tokens
        if exponent is not None and np.any(exponent):
            z = np.ldexp(z, np.asarray(exponent, dtype=np.int64)[:, None])
        probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)  # the sum is >= 1: the likeliest tokens have exp(0)
    order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    if config.top_k is not None:
        sorted_p[:, config.top_k:] = 0.0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    if config.top_p < 1.0:
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
        sorted_p[before > config.top_p] = 0.0  # Meta's rule (strict >); the likeliest has before == 0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    if config.min_p > 0.0:  # after top-k/top-p, as HF; sorted_p[:, 0] is the likeliest token
        sorted_p[sorted_p < config.min_p * sorted_p[:, :1]] = 0.0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, sorted_p, axis=-1)
    return out


def sample(logits: np.ndarray, config, rngs: list[np.random.Generator],
           contexts: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> np.ndarray:
    """One next token per row: (batch, vocab) logits -> (batch,) int64 ids.

    contexts: per row, (prompt ids, new ids so far), which the penalties need.
    Each row draws exactly one uniform number from its own generator (none when
    greedy), so a row's tokens are the same whatever else is in the batch.
    """
    x, e = process_scores(logits, config, contexts)
    if config.greedy:
        return greedy(x)
    return draw(filtered_probs(x, config, e), rngs)

def draw(probs: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One id per row from (batch, vocab) probabilities, one uniform number from each row's generator."""
    cdf = np.cumsum(probs, axis=-1)
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]  # (batch,)
    ids = (cdf <= u[:, None]).sum(axis=-1)  # first index whose cdf exceeds u: never a zero-probability one
    for row in np.flatnonzero(ids == probs.shape[-1]):  # u rounded up to the total: take the last kept token
        ids[row] = np.flatnonzero(probs[row])[-1]
    return ids.astype(np.int64)


def make_rngs(seed: int | Sequence[int] | None, batch_size: int) -> list[np.random.Generator]:
    """One generator per row: an int seed gives row i ``default_rng(seed + i)``; a list gives one each.

    So prompt i of a batch samples exactly as it would alone with seed + i. The seeds are a
    ``GenerationConfig``'s (checked there); only their count is checked here.
    """
    if seed is None:
        return [np.random.default_rng() for _ in range(batch_size)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise InputError(f"got {len(seed)} seeds for {batch_size} prompts")
        return [np.random.default_rng(int(s)) for s in seed]
    return [np.random.default_rng(int(seed) + i) for i in range(batch_size)]
