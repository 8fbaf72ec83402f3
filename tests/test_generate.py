"""Generation: KV-cache decoding, stopping rules, batches, streaming, and stories260K's greedy golden run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import shared_path
from llama2np import InputError, Llama2
from llama2np.generation import generate as generation
from llama2np.generation.decode import Completion
from llama2np.errors import ContextLengthWarning
from llama2np.generation.sampling import log_softmax
from tiny_model import tiny_args, tiny_model

PROMPTS = [[1, 17, 40], [1], [1, 99, 3, 250, 7, 12, 61], [1, 5, 6, 7]]


@pytest.fixture(autouse=True)
def no_eos(monkeypatch):
    """The random model may well produce id 2; only the test about EOS gives it a meaning."""
    monkeypatch.setattr(generation, "LLAMA_EOS", -1)


@pytest.fixture(scope="module")
def tiny() -> Llama2:
    return tiny_model()  # token ids only: no tokenizer


@pytest.fixture(scope="module")
def stories() -> Llama2:
    return Llama2.from_pretrained(shared_path("stories260K", "stories260K.bin"),
                                  tokenizer_path=shared_path("stories260K", "tok512.model"))


def naive_greedy(model: Llama2, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step: no KV cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(model.logits(ids)[-1])))
    return ids[len(prompt):]


def test_kv_cache_decoding_matches_recomputing(tiny):
    for prompt in PROMPTS[:3]:
        assert tiny.generate(prompt, max_new_tokens=12, temperature=0) == naive_greedy(tiny, prompt, 12)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 20)])
def test_batch_equals_each_prompt_alone(tiny, temperature, top_k):
    kw = dict(max_new_tokens=15, temperature=temperature, top_p=0.9, top_k=top_k)
    batch = tiny.generate(PROMPTS, seed=3, **kw)
    alone = [tiny.generate(p, seed=3 + i, **kw) for i, p in enumerate(PROMPTS)]
    assert batch == alone
    assert all(len(r) == 15 for r in batch)


def test_batch_rows_finish_independently(tiny, monkeypatch):
    full = tiny.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0)
    eos = full[2][4]  # make a token row 2 produces the end-of-sequence token
    monkeypatch.setattr(generation, "LLAMA_EOS", eos)
    got = tiny.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0, logprobs=True)
    for row, c in zip(full, got):
        cut = row.index(eos) if eos in row else len(row)
        assert c.ids == row[:cut]
        assert c.finish_reason == ("eos" if eos in row else "length")


def test_same_seed_same_tokens(tiny):
    a = tiny.generate([1, 4], max_new_tokens=20, temperature=1.0, seed=42)
    assert a == tiny.generate([1, 4], max_new_tokens=20, temperature=1.0, seed=42)
    assert a != tiny.generate([1, 4], max_new_tokens=20, temperature=1.0, seed=43)


def test_logprobs_echo_and_stream(tiny):
    prompt = PROMPTS[0]
    c = tiny.generate(prompt, max_new_tokens=6, temperature=1.0, seed=1, logprobs=True)
    assert isinstance(c, Completion) and c.finish_reason == "length" and len(c.logprobs) == 6
    for i, (tok, lp) in enumerate(zip(c.ids, c.logprobs)):  # log p under the model at temperature 1
        expected = log_softmax(tiny.logits(prompt + c.ids[:i])[-1])[tok]
        assert lp == pytest.approx(expected, abs=1e-4)
    assert tiny.generate(prompt, max_new_tokens=6, temperature=1.0, seed=1, echo=True) == prompt + c.ids
    stream = tiny.generate(prompt, max_new_tokens=6, temperature=1.0, seed=1, stream=True)
    assert list(stream) == c.ids and stream.completion.ids == c.ids
    assert stream.stats.new_tokens == 6 and stream.stats.decode_steps == 5
    # the kept KV cache held the prompt from the calls before: only its last token is recomputed
    assert stream.stats.prompt_tokens == 1 and stream.stats.cached_tokens == len(prompt) - 1


def test_empty_prompt_starts_from_bos(tiny):
    assert tiny.generate([], max_new_tokens=5, temperature=0) == naive_greedy(tiny, [1], 5)
    assert tiny.generate([1, 2, 3], max_new_tokens=0) == []


def test_context_length_cuts_with_a_warning():
    model = tiny_model(tiny_args(max_seq_len=16))
    with pytest.warns(ContextLengthWarning, match="context length 16"):
        c = model.generate(list(range(1, 11)), max_new_tokens=20, temperature=0, logprobs=True)
    assert len(c.ids) == 6 and c.finish_reason == "context"
    with pytest.warns(ContextLengthWarning):
        assert model.generate(list(range(1, 17)), max_new_tokens=5) == []
    with pytest.raises(InputError, match="17 tokens.*context length 16"):
        model.generate(list(range(1, 18)), max_new_tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the answer fits: no warning
        assert len(model.generate(list(range(1, 11)), max_new_tokens=6, temperature=0)) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt=[1, "a"]), "prompt"), (dict(prompt=[1, 2.5]), "prompt"), (dict(prompt=None), "prompt"),
    (dict(prompt=[[1, 2], [3, None]]), "prompt"), (dict(prompt=[1, 999]), "999"),
    (dict(prompt="text needs a tokenizer"), "tokenizer"), (dict(prompt=[[1], [2]], stream=True), "stream"),
    (dict(stop=[""]), "stop"),
])
def test_bad_input(tiny, kwargs, match):
    args = dict(prompt=[1, 2], max_new_tokens=3) | kwargs
    with pytest.raises(InputError, match=match):
        tiny.generate(args.pop("prompt"), **args)


# --- stories260K: a real trained model -------------------------------------------------


def test_stories260k_greedy_200_matches_llama2c(stories):
    ref = [int(t) for t in shared_path("reference", "stories260K_greedy_200_ids.txt").read_text().split()]
    assert ref[0] == 1 and len(ref) == 201
    assert stories.generate([], max_new_tokens=200, temperature=0) == ref[1:]
    text = shared_path("reference", "stories260K_greedy_200.txt").read_text()
    assert stories.generate("", max_new_tokens=200, temperature=0) == text
    pieces = list(stories.generate("", max_new_tokens=200, temperature=0, stream=True))
    assert "".join(pieces) == text and len(pieces) > 100


def test_stories260k_text_batch_stream_stop_echo(stories):
    prompts = ["Once upon a time", "Lily and Tom went to", "The sun"]
    kw = dict(max_new_tokens=40, temperature=0.9, top_p=0.9)
    batch = stories.generate(prompts, seed=7, **kw)
    assert batch == [stories.generate(p, seed=7 + i, **kw) for i, p in enumerate(prompts)]
    assert "".join(stories.generate(prompts[0], seed=7, stream=True, **kw)) == batch[0]
    # the text continues the prompt: prompt + text is the decoded whole
    ids = stories.generate(stories.tokenizer.encode(prompts[1]), seed=8, **kw)
    assert prompts[1] + stories.generate(prompts[1], seed=8, **kw) == stories.tokenizer.decode(
        stories.tokenizer.encode(prompts[1]) + ids)
    assert stories.generate(prompts[0], seed=7, echo=True, **kw) == prompts[0] + batch[0]
    echoed = list(stories.generate(prompts[0], seed=7, echo=True, stream=True, **kw))
    assert echoed[0] == prompts[0] and "".join(echoed[1:]) == batch[0]

    full = stories.generate("Once upon a time", max_new_tokens=120, temperature=0)
    assert "Lily" in full
    cut = stories.generate("Once upon a time", max_new_tokens=120, temperature=0, stop=["Lily", "zebra"],
                           logprobs=True)
    assert cut.finish_reason == "stop" and cut.text == full[:full.index("Lily")]
    streamed = stories.generate("Once upon a time", max_new_tokens=120, temperature=0, stop="Lily", stream=True)
    assert "".join(streamed) == cut.text
