"""``GenerationConfig``: every option of a generate / chat call, checked once when it is built.

The names are Hugging Face's ``GenerationConfig`` and OpenAI's completion
parameters where those exist. ``Llama2.generate`` / ``chat`` build one from
their keyword arguments (or take ``config=``, the keyword arguments then
override its fields); the command line and the server build the same object.
Every field is checked in ``__post_init__`` and a bad one is an ``InputError``
naming it; ``dataclasses.replace`` checks again. Inside the package, functions
take the object, never loose options.

What the object cannot know is checked where the model is: logit_bias ids
against the vocabulary (``check_vocab``), a list of seeds against the batch size,
and num_draft against the drafter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..checks import is_int, is_number
from ..errors import InputError
from ..tokenizer import check_text


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling, stopping and output options of one generation (see ``Llama2.generate``)."""

    temperature: float = 0.6  # 0 = greedy (argmax)
    top_p: float = 0.9  # Meta's nucleus: the smallest set whose probability exceeds top_p; 1 = off
    top_k: int | None = None  # sample among the k likeliest; None = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest (after top_p); 0 = off
    repetition_penalty: float = 1.0  # HF / CTRL, over prompt + output; 1 = off
    frequency_penalty: float = 0.0  # OpenAI's: logit -= F x count (new tokens)
    presence_penalty: float = 0.0  # OpenAI's: logit -= P x [count > 0] (new tokens)
    logit_bias: Mapping[int, float] | None = None  # {token id: added logit}; -inf bans
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (a str or a list is accepted); not included in the text
    seed: int | tuple[int, ...] | None = None  # one int (row i of a batch: seed + i), one per row, or None
    logprobs: bool = False  # return Completion objects with log p of each new token
    echo: bool = False  # the result starts with the prompt
    prompt_lookup: int | None = None  # speculative: draft by copying after the last n <= N tokens
    num_draft: int | None = None  # speculative: tokens drafted per forward pass (default 3)

    def __post_init__(self) -> None:
        check = _Checker(self)
        check.number("temperature", lambda t: t >= 0 and np.isfinite(t), "a finite number >= 0 (0 = greedy)")
        check.number("top_p", lambda p: 0 < p <= 1, "in (0, 1]")
        check.integer("top_k", 1, optional=True)
        check.number("min_p", lambda p: 0 <= p <= 1, "in [0, 1] (0 = off)")
        check.number("repetition_penalty", lambda r: 0 < r < np.inf, "a finite number > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            check.number(name, np.isfinite, "a finite number (0 = off; OpenAI uses -2..2)")
        check.integer("max_new_tokens", 0)
        check.integer("prompt_lookup", 1, optional=True, what="an n-gram length")
        check.integer("num_draft", 1, optional=True)
        for name in ("logprobs", "echo"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "logprobs", bool(self.logprobs))
        object.__setattr__(self, "echo", bool(self.echo))
        object.__setattr__(self, "stop", _stop(self.stop))
        object.__setattr__(self, "seed", _seed(self.seed))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("top_k", "max_new_tokens", "prompt_lookup", "num_draft"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with ``changes`` (checked again); InputError naming an unknown option."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown generation option {unknown[0]!r}; the options are "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def check_vocab(self, vocab_size: int) -> None:
        """InputError if a logit_bias key is not a token id of a ``vocab_size``-token vocabulary."""
        bad = [t for t in (self.logit_bias or {}) if t >= vocab_size]
        if bad:
            raise InputError(f"logit_bias key {bad[0]!r} is not a token id in the vocabulary [0, {vocab_size})")


class _Checker:
    def __init__(self, config: GenerationConfig):
        self.config = config

    def number(self, name: str, ok, what: str) -> None:
        value = getattr(self.config, name)
        if not is_number(value) or not ok(value):
            raise InputError(f"{name} must be {what}, got {value!r}")

    def integer(self, name: str, low: int, optional: bool = False, what: str = "an integer") -> None:
        value = getattr(self.config, name)
        if optional and value is None:
            return
        if not is_int(value) or value < low:
            raise InputError(f"{name} must be {what} >= {low}{' or None' if optional else ''}, got {value!r}")


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise InputError(f"stop must be a str, a list of str or None, got {type(stop).__name__} {stop!r}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise InputError(f"stop must be a non-empty str or a list of them, got {list(stop)!r}")
    for s in stop:
        check_text(s, "a stop string")
    return tuple(stop)


def _seed(seed):
    if seed is None:
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    for s in seeds:
        if not is_int(s) or s < 0:
            raise InputError(f"seed must be an integer >= 0, a list of them, or None; got {s!r}")
    return tuple(int(s) for s in seeds) if isinstance(seed, (list, tuple)) else int(seed)


def _logit_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise InputError(f"logit_bias must be a dict of token id -> added logit, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        if not is_int(token) or token < 0:
            raise InputError(f"logit_bias key {token!r} is not a token id in the vocabulary (an int >= 0)")
        if not is_number(value) or np.isnan(value) or value == np.inf:
            raise InputError(f"logit_bias[{token}] must be a finite number or -inf (ban), got {value!r}")
        out[int(token)] = float(value)
    return out or None
