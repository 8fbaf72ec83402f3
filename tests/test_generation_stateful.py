"""Any interleaving of calls on one model gives what a fresh model gives: a hypothesis state machine.

Rules: generate (text or ids, greedy or seeded), start a stream, read some of a stream (streams stay
open across other rules), logits, chat, a batch and clear_cache, all on one ``Llama2`` with its kept
KV cache. After each step the result equals the same call on a reference with ``reuse_cache=False``
(greedy: token-identical; logits within 1e-5 in float32, 1e-12 in float64).

CI runs the deterministic "ci" profile; ``HYPOTHESIS_PROFILE=long`` runs many more examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llama2np import Llama2

REPO = Path(__file__).resolve().parents[1]

for name, kwargs in (("ci", dict(max_examples=25, derandomize=True, deadline=None)),
                     ("long", dict(max_examples=500, deadline=None))):
    try:  # registered once, here or in conftest.py
        settings.get_profile(name)
    except InvalidArgument:
        settings.register_profile(name, **kwargs)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG = PROFILE == "long"
STATE = settings(settings.get_profile(PROFILE), max_examples=100 if LONG else 20,
                 stateful_step_count=30 if LONG else 10, suppress_health_check=[HealthCheck.too_slow])

_models: dict[str, tuple[Llama2, Llama2]] = {}


def models(kind: str) -> tuple[Llama2, Llama2]:
    """(the model under test, a reference on the same weights with its own kept cache), loaded once."""
    if kind not in _models:
        if kind == "demo":
            m = Llama2.from_pretrained(REPO / "weights" / "demo", progress=False)
        else:  # a small golden model in float64, no tokenizer
            m = Llama2.from_pretrained(REPO / "tests" / "golden" / "gqa2", dtype="float64", progress=False)
        _models[kind] = (m, Llama2(m.model, m._tokenizer, source=m.source, progress=False))
    return _models[kind]


WORDS = ["Once", " upon", " a time", " Lily", " the dog", " ran", " and", " saw", " a big", " tree", "."]


class Interleaving(RuleBasedStateMachine):
    kind = "demo"

    @initialize()
    def load(self):
        self.model, self.ref = models(self.kind)
        self.model.clear_cache()
        self.vocab = self.model.args.vocab_size
        self.text = self.model.has_tokenizer
        self.tol = 1e-12 if self.model.model.dtype == np.float64 else 1e-5
        self.streams: list[tuple[object, list, list]] = []  # (stream, expected pieces, pieces read so far)

    # --- prompts -----------------------------------------------------------------------------

    def ids(self, data, lo=1, hi=12) -> list[int]:
        return [1] + data.draw(st.lists(st.integers(3, self.vocab - 1), min_size=lo - 1, max_size=hi - 1))

    def prompt(self, data):
        if self.text and data.draw(st.booleans()):
            return "".join(data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4)))
        # often a prefix of an earlier prompt or an extension of it: the case KV reuse is for
        return self.ids(data)

    def options(self, data) -> dict:
        n = data.draw(st.integers(0, 6))
        if data.draw(st.booleans()):
            return dict(max_new_tokens=n, temperature=0)
        return dict(max_new_tokens=n, temperature=data.draw(st.sampled_from([0.7, 1.0])),
                    seed=data.draw(st.integers(0, 3)), top_k=data.draw(st.sampled_from([None, 5])))

    # --- rules ---------------------------------------------------------------------------------

    @rule(data=st.data())
    def generate(self, data):
        prompt, opts = self.prompt(data), self.options(data)
        assert self.model.generate(prompt, **opts) == self.ref.generate(prompt, reuse_cache=False, **opts)

    @rule(data=st.data())
    def logits(self, data):
        ids = self.ids(data, hi=16)
        got = self.model.logits(ids)
        np.testing.assert_allclose(got, self.ref.logits(ids, reuse_cache=False), rtol=0, atol=self.tol * 10)

    @precondition(lambda self: self.text)
    @rule(data=st.data())
    def chat(self, data):
        content = "".join(data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)))
        dialog = [{"role": "user", "content": content}]
        opts = self.options(data)
        assert self.model.chat(dialog, **opts) == self.ref.chat(dialog, reuse_cache=False, **opts)

    @rule(data=st.data())
    def batch(self, data):
        prompts = [self.ids(data) for _ in range(data.draw(st.integers(2, 3)))]
        opts = self.options(data)
        assert self.model.generate(prompts, **opts) == self.ref.generate(prompts, reuse_cache=False, **opts)

    @rule()
    def clear_cache(self):
        self.model.clear_cache()

    @precondition(lambda self: len(self.streams) < 3)
    @rule(data=st.data())
    def start_stream(self, data):
        prompt, opts = self.prompt(data), self.options(data)
        expected = list(self.ref.generate(prompt, stream=True, reuse_cache=False, **opts))
        self.streams.append((self.model.generate(prompt, stream=True, **opts), expected, []))

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def read_stream(self, data):
        i = data.draw(st.integers(0, len(self.streams) - 1))
        stream, expected, read = self.streams[i]
        for _ in range(data.draw(st.integers(1, 3))):
            piece = next(stream, None)
            if piece is None:
                assert read == expected
                self.streams.pop(i)
                return
            read.append(piece)

    @invariant()
    def streams_so_far_match(self):
        for _, expected, read in getattr(self, "streams", []):
            assert read == expected[:len(read)]


class GoldenInterleaving(Interleaving):
    kind = "gqa2"


TestDemoInterleaving = Interleaving.TestCase
TestDemoInterleaving.settings = STATE
TestGoldenInterleaving = GoldenInterleaving.TestCase
TestGoldenInterleaving.settings = STATE


@pytest.fixture(autouse=True, scope="module")
def _free():
    yield
    _models.clear()
