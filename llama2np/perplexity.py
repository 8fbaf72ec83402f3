"""Perplexity of a text under the model, with a sliding window over the context length."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError
from .model import Transformer
from .progress import bar
from .sampling import log_softmax


@dataclass
class PerplexityResult:
    perplexity: float  # exp(mean negative log-likelihood per predicted token)
    nll: float  # mean negative log-likelihood (nats per token)
    tokens: int  # tokens predicted (all but the first)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def perplexity(model: Transformer, ids: Sequence[int], window: int | None = None,
               stride: int | None = None) -> PerplexityResult:
    """Score every token after the first given the ones before it (at most ``window`` of them).

    A text longer than the window is read in windows that start ``stride``
    tokens apart (default: half a window); each token is scored once, in the
    first window that holds it with the most context before it that the
    stride allows.
    """
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise InputError(f"{name} must be an int or None (the default), got {type(value).__name__} {value!r}")
    ids = np.asarray(list(ids), dtype=np.int64)
    window = model.args.max_seq_len if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 2 <= window <= model.args.max_seq_len:
        raise InputError(f"window must be in [2, {model.args.max_seq_len}], got {window}")
    if not 1 <= stride <= window - 1:
        raise InputError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    if ids.size < 2:
        raise InputError(f"perplexity needs at least 2 tokens (BOS and one more), got {ids.size}")
    t0 = time.perf_counter()
    total, scored, begin = 0.0, 1, 0  # positions < scored are already counted (position 0 never is)
    n_windows = 1 + -(-max(0, ids.size - window) // stride)
    windows = bar(total=n_windows, desc="perplexity", unit="window", progress=model.progress)
    while scored < ids.size:
        end = min(begin + window, ids.size)
        logits = model.forward(ids[None, begin:end])[0]  # (end - begin, vocab): predicts ids[begin+1 : end+1]
        targets = np.arange(scored, end)  # absolute positions scored in this window
        logp = log_softmax(logits[targets - 1 - begin])  # (n, vocab)
        total -= float(logp[np.arange(targets.size), ids[targets]].sum())
        scored, begin = end, begin + stride
        if windows is not None:
            windows.update(1)
    if windows is not None:
        windows.close()
    n = ids.size - 1
    return PerplexityResult(math.exp(total / n), total / n, n, time.perf_counter() - t0)
