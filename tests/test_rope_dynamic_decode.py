"""Dynamic RoPE scaling through the decode loop: every way of generating gives generation's logits.

With dynamic NTK scaling a key's rotation depends on the forward pass that computed it
(``llama2np.model.rope``). Generation computes, as Hugging Face's ``generate`` does with
its KV cache, the prompt in one pass and then one pass per new token; the golden tests
(``test_rope_scaling.py``) hold those passes to HF's float64 logits. Here: whatever the
decode loop does around them (the kept KV cache reused by the next call, a stream paused
while another call overwrites that cache, rows of a continuously batched decode at
different lengths, drafts), each sequence gets exactly the logits of those passes.

The model: 32 positions of original context, factor 2 (so 64 in all).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_rope_scaling import fixture, write_layout

from llama2np import GenerationConfig, Llama2
from llama2np.generation.decode import Decoder
from llama2np.generation.generate import new_request
from llama2np.generation.sampling import log_softmax

ORIGINAL = 32  # the fixture's max_position_embeddings


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_layout("hf", "dynamic", tmp_path_factory.mktemp("dynamic") / "hf")


@pytest.fixture(scope="module")
def ids():
    return fixture("dynamic")[1]["ids"].tolist()


def load(path) -> Llama2:
    return Llama2.from_pretrained(path, dtype="float64")


def generation_logits(model: Llama2, seq: list[int], prompt_len: int) -> np.ndarray:
    """Logits of positions prompt_len - 1 .. len(seq) - 1 as generation computes them: the prompt in
    one forward pass, then one pass per token (the passes the golden tests check against HF)."""
    t = model.model
    cache = t.new_cache(1, len(seq))
    out = [t.forward(np.array([seq[:prompt_len]]), 0, cache)[0, -1:]]
    out += [t.forward(np.array([seq[p:p + 1]]), p, cache)[0] for p in range(prompt_len, len(seq) - 1)]
    return np.concatenate(out)


def check_generated(model: Llama2, prompt: list[int], done) -> None:
    """The logprobs of ``done`` (a greedy Completion) are those of generation's passes over its tokens."""
    seq = prompt + done.ids
    want = log_softmax(generation_logits(model, seq, len(prompt)))[np.arange(len(done.ids)), done.ids]
    assert np.abs(np.subtract(done.logprobs, want)).max() < 1e-12
    assert len(seq) > ORIGINAL + 1  # the check reached past the original context


GREEDY = dict(temperature=0, logprobs=True, logit_bias={2: float("-inf")})  # no EOS: run past the context


@pytest.mark.parametrize("prompt_len", [20, 40])  # prompt within the original context / beyond it
def test_generate_is_generations_passes(path, ids, prompt_len):
    model = load(path)
    done = model.generate(ids[:prompt_len], max_new_tokens=16, reuse_cache=False, **GREEDY)
    check_generated(model, ids[:prompt_len], done)


def test_kept_cache_reused_where_the_rotation_is_alike(path, ids):
    """The next call reuses the kept cache exactly where its keys are rotated as its own passes would
    rotate them, and computes the rest: same prompt past the context (one 40-long pass both times)
    -> 39 positions reused; a longer prompt past it (another base) -> none; within it -> all shared."""
    model = load(path)
    first = model.generate(ids[:40], max_new_tokens=6, **GREEDY)
    again = model.generate(ids[:40], max_new_tokens=6, **GREEDY)
    assert model.last_stats.cached_tokens == 39 and again.ids == first.ids
    assert np.abs(np.subtract(again.logprobs, first.logprobs)).max() < 1e-12
    longer = model.generate(ids[:44], max_new_tokens=6, **GREEDY)
    assert model.last_stats.cached_tokens == 0
    check_generated(model, ids[:44], longer)
    model.generate(ids[:20], max_new_tokens=4, **GREEDY)  # positions 0..22 rotated with the plain base
    within = model.generate(ids[:24], max_new_tokens=16, **GREEDY)
    assert model.last_stats.cached_tokens == 20
    check_generated(model, ids[:24], within)
    # the kept cache now holds a prompt's keys plus decoded ones past the context; a prompt that
    # continues it is one pass over all (another rotation than the decoded keys got): recomputed
    follow = model.generate(ids[:24] + within.ids, max_new_tokens=4, **GREEDY)
    assert model.last_stats.cached_tokens == 0
    check_generated(model, ids[:24] + within.ids, follow)


def test_logits_after_generation_are_one_pass(path, ids):
    """Llama2.logits is one forward pass over the sequence, whatever the kept cache holds."""
    model = load(path)
    model.generate(ids[:24], max_new_tokens=30, **GREEDY)  # decoded keys past the context, a pass each
    ref = fixture("dynamic")[1]
    assert np.abs(model.logits(ids) - ref["beyond_formula"]).max() < 1e-12
    assert np.abs(model.logits(ids[:24]) - ref["within_formula"]).max() < 1e-12


def test_paused_stream_resumes_as_uninterrupted(path, ids):
    """A stream whose kept cache another call overwrote between two pieces recomputes the lost
    positions in generation's own passes: the rest is what an uninterrupted stream gives."""
    model = load(path)
    alone = load(path).generate(ids[:24], max_new_tokens=24, reuse_cache=False, **GREEDY)
    stream = model.generate(ids[:24], max_new_tokens=24, stream=True, **GREEDY)
    got = [next(stream) for _ in range(14)]  # now decoding past the original context
    model.generate(ids[:10] + ids[30:50], max_new_tokens=3, temperature=0)  # shares 10 positions only
    got += list(stream)
    assert got == alone.ids
    assert stream.completion.ids == alone.ids
    assert np.abs(np.subtract(stream.completion.logprobs, alone.logprobs)).max() < 1e-12
    assert stream.stats.recomputed_tokens > 0  # the overwritten positions were computed again


def test_batch_rows_at_different_lengths_decode_as_alone(path, ids):
    """Continuous batching: requests joining at different steps, one row within the original context
    while others are past it, each row at its own position and base in the one forward per step."""
    model = load(path)
    config = GenerationConfig(max_new_tokens=14, **GREEDY)
    prompts = [ids[:20], ids[:36], ids[3:30], ids[:45]]
    dec = Decoder(model.model, progress=False)
    requests = [new_request(model.model, None, p, config) for p in prompts]
    dec.add(requests[:2])
    for _ in range(5):
        dec.step()
    dec.add(requests[2:])
    dec.run()
    assert dec.stats.forward_passes < sum(len(r.new_ids) for r in requests)  # rows did share forwards
    for p, r in zip(prompts, requests):
        check_generated(model, p, r.completion())


def test_drafting_stays_exact_past_the_original_context(path, ids):
    """A draft is checked in one pass, so drafts stop at the original context; past it decoding is
    one token per pass. Greedy output and logprobs are plain greedy decoding's."""
    model = load(path)
    prompt = (ids[:8] * 3)[:22]  # repeats, so prompt lookup has something to copy
    plain = model.generate(prompt, max_new_tokens=24, reuse_cache=False, **GREEDY)
    drafted = model.generate(prompt, max_new_tokens=24, prompt_lookup=3, reuse_cache=False, **GREEDY)
    assert model.last_stats.drafted > 0
    assert drafted.ids == plain.ids
    assert np.abs(np.subtract(drafted.logprobs, plain.logprobs)).max() < 1e-12
    check_generated(model, prompt, plain)


def test_rows_are_rotated_as_their_own_pass(path):
    """RopeTable.rows: row b as a one-token pass ending at positions[b] + 1 (its own base past the context)."""
    from llama2np.model.rope import rope_tables

    model = load(path).model
    positions = np.array([5, 40, 31, 33, 63])
    got = model.rope.rows(positions)
    for b, p in enumerate(positions):
        np.testing.assert_array_equal(got[b], rope_tables(model.args, np.float64, p + 1, p, seq_len=p + 1)[0])
    assert np.abs(got[1] - model.rope(0, 64)[40]).max() > 1e-3  # not the batch's longest row's base


def test_passes_as_generation_groups_them(path, ids):
    """The prefix cache computes positions in generation's passes: within the context one pass; past it the
    plain part in one, then one per decoded position (a prompt past it: the prompt in one)."""
    from llama2np.generation.prefix_cache import PrefixCache

    model = load(path)
    calls = []
    forward = model.model.forward
    model.model.forward = lambda tokens, start=0, cache=None, on_layer=None: (
        calls.append((start, start + tokens.shape[1])) or forward(tokens, start, cache, on_layer))
    cache = PrefixCache(model.model)
    cache.forward(ids[:30], prompt_len=10)
    assert calls == [(0, 30)]
    calls.clear()
    cache.forward(ids[:10] + ids[40:50], prompt_len=10)  # shares 10 positions
    assert calls == [(10, 20)]
    calls.clear()
    cache = PrefixCache(model.model)
    cache.forward(ids[:36], prompt_len=20)
    assert calls == [(0, 32), (32, 33), (33, 34), (34, 35), (35, 36)]
    calls.clear()
    PrefixCache(model.model).forward(ids[:38], prompt_len=34)
    assert calls == [(0, 34), (34, 35), (35, 36), (36, 37), (37, 38)]
