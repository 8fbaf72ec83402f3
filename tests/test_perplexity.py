"""Perplexity in sliding windows equals the negative log-likelihood summed by hand over the same windows."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path
from llama2np.generation.sampling import log_softmax


def test_stories260k_perplexity_windows(stories):
    text = shared_path("reference", "stories260K_greedy_200.txt").read_text()
    ids = stories.tokenizer.encode(text)
    assert len(ids) == 201

    def nll(begin, end, first):  # scores positions first..end-1 using the window [begin, end)
        logp = log_softmax(stories.logits(ids[begin:end]))
        return -sum(logp[t - 1 - begin, ids[t]] for t in range(first, end))

    whole = nll(0, 201, 1) / 200
    assert stories.perplexity(text) == pytest.approx(np.exp(whole), rel=1e-6)
    by_hand = (nll(0, 128, 1) + nll(64, 192, 128) + nll(128, 201, 192)) / 200
    assert stories.perplexity(text, window=128, stride=64) == pytest.approx(np.exp(by_hand), rel=1e-6)
    assert 1.0 < stories.perplexity(text) < 3.0  # the model wrote this text greedily


