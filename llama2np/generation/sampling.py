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

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..checks import is_int, is_number
from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        check_processors(self.min_p, self.repetition_penalty, self.frequency_penalty, self.presence_penalty,
                         self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_sampling(temperature, top_p, top_k, max_new_tokens=0) -> None:
    """Raise InputError naming the first bad sampling argument."""
    if not is_number(temperature) or not temperature >= 0 or not np.isfinite(temperature):
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
            or max_new_tokens < 0):
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def check_processors(min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                     logit_bias=None, vocab_size: int | None = None) -> None:
    """Raise InputError naming the first bad penalty, min_p or logit_bias."""
    if not is_number(min_p) or not 0 <= min_p <= 1:
        raise InputError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")
    if not is_number(repetition_penalty) or not 0 < repetition_penalty < np.inf:
        raise InputError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not is_number(value) or not np.isfinite(value):
            raise InputError(f"{name} must be a finite number (0 = off; OpenAI uses -2..2), got {value!r}")
    if logit_bias is None:
        return
    if not isinstance(logit_bias, Mapping):
        raise InputError(f"logit_bias must be a dict of token id -> added logit, got {type(logit_bias).__name__}")
    for token, bias in logit_bias.items():
        if not is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            where = f" [0, {vocab_size})" if vocab_size is not None else " (an int >= 0)"
            raise InputError(f"logit_bias key {token!r} is not a token id in the vocabulary{where}")
        if not is_number(bias) or np.isnan(bias) or bias == np.inf:
            raise InputError(f"logit_bias[{token}] must be a finite number or -inf (ban), got {bias!r}")


# --- logits processors: (batch, vocab) logits + each row's tokens so far -> adjusted logits -----


class LogitBias:
    """Add a fixed amount to chosen tokens' logits (-inf bans a token)."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = np.array(list(bias), dtype=np.int64)
        self.values = np.array(list(bias.values()), dtype=np.float64)

    def __call__(self, logits: np.ndarray, seen: Sequence[np.ndarray], new: Sequence[np.ndarray]) -> np.ndarray:
        logits[:, self.ids] += self.values
        return logits


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al. 2019), as HF applies it: each token in prompt + output, once."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, logits, seen, new):
        for row, ids in enumerate(seen):
            ids = np.unique(ids)
            x = logits[row, ids]
            logits[row, ids] = np.where(x < 0, x * self.penalty, x / self.penalty)
        return logits


class FrequencyPresencePenalty:
    """OpenAI's penalties: subtract frequency * count + presence * (count > 0), counting new tokens."""

    def __init__(self, frequency: float, presence: float):
        self.frequency, self.presence = frequency, presence

    def __call__(self, logits, seen, new):
        for row, ids in enumerate(new):
            counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=logits.shape[-1])
            logits[row] -= self.frequency * counts + self.presence * (counts > 0)
        return logits


def logits_processors(params: SamplingParams) -> list:
    """The processors ``params`` asks for, in HF's order (an empty list when none)."""
    procs = []
    if params.logit_bias:
        procs.append(LogitBias(params.logit_bias))
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(float(params.repetition_penalty)))
    if params.frequency_penalty or params.presence_penalty:
        procs.append(FrequencyPresencePenalty(float(params.frequency_penalty), float(params.presence_penalty)))
    return procs


def process_logits(logits: np.ndarray, params: SamplingParams,
                   contexts: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> np.ndarray:
    """Apply ``params``' processors: (batch, vocab) logits -> (batch, vocab) float64.

    contexts: per row, (prompt ids, new ids so far). Without processors the
    logits come back unchanged (not copied, not widened).
    """
    procs = logits_processors(params)
    if not procs:
        return logits
    if contexts is None or len(contexts) != len(logits):
        raise ValueError("the penalties need each row's (prompt ids, new ids)")
    new = [np.asarray(n, dtype=np.int64) for _, n in contexts]
    seen = [np.concatenate([np.asarray(p, dtype=np.int64), n]) for (p, _), n in zip(contexts, new)]
    x = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay as they were
    for proc in procs:
        x = proc(x, seen, new)
    return x


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from: (batch, vocab) logits -> (batch, vocab) probabilities.

    Zero outside the top-k / top-p / min-p set, renormalised inside it. Float64,
    so a row's result does not depend on which batch it is in. The logits are
    those after ``process_logits``.
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
    if params.min_p > 0.0:  # after top-k/top-p, as HF; sorted_p[:, 0] is the likeliest token
        sorted_p[sorted_p < params.min_p * sorted_p[:, :1]] = 0.0
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, sorted_p, axis=-1)
    return out


def sample(logits: np.ndarray, params: SamplingParams, rngs: list[np.random.Generator],
           contexts: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> np.ndarray:
    """One next token per row: (batch, vocab) logits -> (batch,) int64 ids.

    contexts: per row, (prompt ids, new ids so far), which the penalties need.
    Each row draws exactly one uniform number from its own generator (none when
    greedy), so a row's tokens are the same whatever else is in the batch.
    """
    logits = process_logits(np.asarray(logits), params, contexts)
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return draw(filtered_probs(logits, params), rngs)


def draw(probs: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One id per row from (batch, vocab) probabilities, one uniform number from each row's generator."""
    cdf = np.cumsum(probs, axis=-1)
    u = np.array([rng.random() for rng in rngs]) * cdf[:, -1]  # (batch,)
    ids = (cdf <= u[:, None]).sum(axis=-1)  # first index whose cdf exceeds u: never a zero-probability one
    for row in np.flatnonzero(ids == probs.shape[-1]):  # u rounded up to the total: take the last kept token
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
        seeds = [int(seed) + i if is_int(seed) else seed for i in range(batch_size)]  # Python ints: no int64 wrap
    for s in seeds:
        if not is_int(s) or s < 0:
            raise InputError(f"seed must be an integer >= 0 (or None), got {s!r}")
    return [np.random.default_rng(int(s)) for s in seeds]


