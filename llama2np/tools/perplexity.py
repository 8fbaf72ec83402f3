"""Perplexity of a text under the model, with a sliding window over the context length."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..generation.sampling import log_softmax
from ..model.transformer import Transformer
from ..progress import bar


@dataclass
class PerplexityResult:
    perplexity: float  # exp(mean negative log-likelihood per predicted token)
    nll: float  # mean negative log-likelihood (nats per token)
    tokens: int  # tokens predicted (all but the first)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def check_window(model: Transformer, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) with their defaults (the context length, half a window), checked."""
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise InputError(f"{name} must be an int or None (the default), got {type(value).__name__} {value!r}")
    window = model.args.max_seq_len if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 2 <= window <= model.args.max_seq_len:
        raise InputError(f"window must be in [2, {model.args.max_seq_len}], got {window}")
    if not 1 <= stride <= window - 1:
        raise InputError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    return window, stride


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int, int]]:
    """How to read ``n`` tokens in windows: (begin, end, first, last) for each.

    Run the model on ids[begin:end] and keep the logits of positions [first, last):
    every position's logits are kept exactly once, from the first window that holds
    it with the most context before it that the stride allows (a window's last
    position is left to the next window, which sees more before it).
    """
    begin, first = 0, 0
    while first < n:
        end = min(begin + window, n)
        last = end - 1 if end < n else n
        yield begin, end, first, last
        begin, first = begin + stride, last


def perplexity(model: Transformer, ids: Sequence[int], window: int | None = None,
               stride: int | None = None, progress: bool | None = None) -> PerplexityResult:
    """Score every token after the first given the ones before it (at most ``window`` of them).

    A text longer than the window is read in windows that start ``stride``
    tokens apart (default: half a window); each token is scored once, in the
    first window that holds it with the most context before it that the
    stride allows. progress: a bar over the windows (None: on a terminal or in a notebook).
    """
    ids = np.asarray(list(ids), dtype=np.int64)
    window, stride = check_window(model, window, stride)
    if ids.size < 2:
        raise InputError(f"perplexity needs at least 2 tokens (BOS and one more), got {ids.size}")
    t0 = time.perf_counter()
    total = 0.0
    spans = list(windows(ids.size, window, stride))
    for begin, end, first, last in bar(spans, desc="perplexity", unit="window", progress=progress):
        last = min(last, ids.size - 1)  # the last position predicts nothing
        logits = model.forward(ids[None, begin:end])[0]  # (end - begin, vocab): predicts ids[begin+1 : end+1]
        logp = log_softmax(logits[first - begin:last - begin])  # (last - first, vocab)
        total -= float(logp[np.arange(last - first), ids[first + 1:last + 1]].sum())
    n = ids.size - 1
    return PerplexityResult(math.exp(total / n), total / n, n, time.perf_counter() - t0)
