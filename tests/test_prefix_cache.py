"""The prefix cache: rollback after rejected drafts, reuse of a shared prefix across calls and chat turns."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np.generation import generate as generation
from llama2np.generation.chat import dialog_tokens
from llama2np.generation.prefix_cache import PrefixCache
from test_drafting import REPEAT, STORY
from tiny_model import tiny_model


def test_rollback_after_rejected_drafts_gives_fresh_logits():
    model = tiny_model()
    cache = PrefixCache(model.model)
    seq = [1, 17, 40, 8, 99, 3]
    cache.forward(seq + [5, 6, 7, 8])  # a draft of 4, all to be rejected
    start, logits = cache.forward(seq + [250, 11])  # the correction and one more
    assert start == len(seq)
    fresh = model.logits(seq + [250, 11], reuse_cache=False)
    np.testing.assert_allclose(logits, fresh[start:], rtol=1e-5, atol=1e-5)


def test_kept_cache_after_speculative_generation_matches_a_fresh_forward(stories):
    out = stories.generate(REPEAT, max_new_tokens=40, temperature=0, prompt_lookup=1)
    assert stories.last_stats.accepted < stories.last_stats.drafted  # some drafts were rolled back
    ids = stories.tokenizer.encode(REPEAT + out, bos=True)[:-2] + [42, 7]
    start, logits = stories._prefix.forward(ids)
    assert start > len(stories.tokenizer.encode(REPEAT, bos=True))
    np.testing.assert_allclose(logits, stories.logits(ids, reuse_cache=False)[start:], rtol=1e-4, atol=1e-4)


def test_logits_reuse_the_shared_prefix_and_equal_a_fresh_computation():
    model = tiny_model()
    a, b = [1, 17, 40, 8, 99, 3, 5], [1, 17, 40, 8, 77, 6]
    model.logits(a)
    for ids in (b, a[:4], a + [9, 9]):
        np.testing.assert_allclose(model.logits(ids), model.logits(ids, reuse_cache=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.logits(np.array([a, a]))[1], model.logits(a), rtol=1e-5, atol=1e-5)


def test_generate_reuses_the_previous_prompt(stories):
    stories.generate(STORY, max_new_tokens=5, temperature=0)
    stories.generate(STORY + " She", max_new_tokens=5, temperature=0)
    n = len(stories.tokenizer.encode(STORY, bos=True))
    assert stories.last_stats.cached_tokens >= n - 1
    stories.generate(STORY, max_new_tokens=5, temperature=0, reuse_cache=False)
    assert stories.last_stats.cached_tokens == 0


def test_chat_second_turn_prefills_only_the_new_turn(demo):
    demo.clear_cache()
    turn1 = [{"role": "user", "content": "Tell me about a cat."}]
    answer = demo.chat(turn1, max_new_tokens=12, temperature=0)
    first = demo.last_stats
    assert first.cached_tokens == 0 and first.prompt_tokens == len(dialog_tokens(demo.tokenizer, turn1))
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a dog?"}]
    want = demo.chat(turn2, max_new_tokens=12, temperature=0, reuse_cache=False)
    assert demo.chat(turn2, max_new_tokens=12, temperature=0) == want
    again = demo.chat(turn2, max_new_tokens=12, temperature=0, reuse_cache=True)
    demo.clear_cache()
    demo.chat(turn1, max_new_tokens=12, temperature=0)
    demo.chat(turn2, max_new_tokens=12, temperature=0)
    second = demo.last_stats
    total = len(dialog_tokens(demo.tokenizer, turn2))
    new_turn = len(demo.tokenizer.encode("[INST] And a dog? [/INST]", bos=True)) + 1  # + the first turn's EOS
    assert second.cached_tokens + second.prompt_tokens == total
    assert second.prompt_tokens <= new_turn + 3  # at most a few re-tokenised pieces of the answer's end
    assert again == want  # the kept cache (turn 2 just decoded through it) changes nothing


def test_an_interrupted_forward_leaves_no_stale_prefix(monkeypatch):
    monkeypatch.setattr(generation, "LLAMA_EOS", -1)
    model = tiny_model()
    ids = [1, 17, 40, 8, 99, 5, 6, 12]
    model.generate(ids, max_new_tokens=2, temperature=0)  # keeps ids[:8] and one new token
    real = model.model.forward

    def interrupted(tokens, start_pos=0, cache=None, *args, **kw):
        cache.k[:, :, :, start_pos:] = 7.0  # half-written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(model.model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(ids[:3] + [250], max_new_tokens=3, temperature=0)  # overwrites positions >= 3
    monkeypatch.setattr(model.model, "forward", real)
    assert model.generate(ids, max_new_tokens=6, temperature=0) == \
        model.generate(ids, max_new_tokens=6, temperature=0, reuse_cache=False)


