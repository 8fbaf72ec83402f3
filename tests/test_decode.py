"""The decode loop: streams that stay right whatever runs between their pieces, requests that join and
leave a Decoder between steps, stop strings split across tokens, and the log-probabilities it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama2np import GenerationConfig, InputError, Llama2
from llama2np.generation.decode import Decoder
from llama2np.generation.generate import new_request
from llama2np.generation.sampling import log_softmax

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"


@pytest.fixture(scope="module")
def demo() -> Llama2:
    return Llama2.from_pretrained(DEMO)


def fresh(model: Llama2, prompt, **options):
    return model.generate(prompt, reuse_cache=False, **options)


def test_a_paused_stream_continues_right_after_other_calls(demo):
    ids = demo.tokenizer.encode("Once upon a time there was a little girl named")[:10]
    expected = fresh(demo, ids, max_new_tokens=8, temperature=0)
    stream = demo.generate(ids, max_new_tokens=8, temperature=0, stream=True)
    got = [next(stream), next(stream)]
    demo.logits(demo.tokenizer.encode("The dog ran to the park"))  # reuses the kept KV cache
    got.append(next(stream))
    demo.generate("A cat", max_new_tokens=3, temperature=0)  # so does this
    demo.clear_cache()
    got += list(stream)
    assert got == expected
    assert stream.completion.ids == expected and stream.stats.recomputed_tokens > 0


def test_two_interleaved_streams_and_a_chat(demo):
    a_ids, b_text = [1, 365, 263], "The dog"
    want_a = fresh(demo, a_ids, max_new_tokens=6, temperature=0.8, seed=4)
    want_b = fresh(demo, b_text, max_new_tokens=6, temperature=0)
    a = demo.generate(a_ids, max_new_tokens=6, temperature=0.8, seed=4, stream=True)
    b = demo.generate(b_text, max_new_tokens=6, temperature=0, stream=True)
    got_a, got_b = [], []
    for _ in range(3):
        got_a.append(next(a))
        got_b.append(next(b, ""))
    demo.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2, temperature=0)
    got_a += list(a)
    got_b += list(b)
    assert got_a == want_a and "".join(got_b) == want_b


def test_requests_join_and_leave_a_decoder_between_steps(demo):
    cfg = GenerationConfig(max_new_tokens=5, temperature=0)
    long_cfg = cfg.replace(max_new_tokens=9)
    tok = demo.tokenizer
    decoder = Decoder(demo.model, progress=False)
    first = new_request(demo.model, tok, "Once upon a time", long_cfg)
    decoder.add([first])
    decoder.step()
    decoder.step()
    pair = [new_request(demo.model, tok, "The dog", cfg), new_request(demo.model, tok, "Tom had a", cfg)]
    decoder.add(pair)  # a lockstep group of two joins a running one
    gone = new_request(demo.model, tok, "Lily", long_cfg)
    decoder.add([gone])
    decoder.step()
    gone.cancel()
    texts = {id(r): "" for r in [first, *pair]}
    while decoder.running:
        for r, text in decoder.step():
            if id(r) in texts:
                texts[id(r)] += text
    assert gone.finish_reason == "cancelled" and gone not in decoder.running
    for r, prompt, c in [(first, "Once upon a time", long_cfg), (pair[0], "The dog", cfg), (pair[1], "Tom had a", cfg)]:
        assert r.completion().text == fresh(demo, prompt, config=c), prompt
    assert decoder.stats.forward_passes > 0


def test_a_stop_string_split_across_tokens_is_held_back_then_cut(demo):
    prompt, n = "Once upon a time", 30
    pieces = list(demo.generate(prompt, max_new_tokens=n, temperature=0, stream=True, reuse_cache=False))
    full = "".join(pieces)
    # a stop string that begins inside one piece and ends inside the next
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    streamed = list(demo.generate(prompt, max_new_tokens=n, temperature=0, stop=stop, stream=True,
                                  reuse_cache=False))
    assert "".join(streamed) == full[:full.index(stop)]
    assert stream_end(streamed) <= full.index(stop)
    # a stop string whose start appears but whose end never does: what was held back comes out later
    never = pieces[i][-2:] + "\u2603\u2603"
    held = list(demo.generate(prompt, max_new_tokens=n, temperature=0, stop=[never], stream=True,
                              reuse_cache=False))
    assert "".join(held) == full and held != pieces  # the same text, in other pieces


def stream_end(pieces: list[str]) -> int:
    return len("".join(pieces))


def test_batch_logprobs_are_log_softmax_of_the_logits(demo):
    prompts = [[1, 365, 263, 931], [1, 450, 112]]
    completions = demo.generate(prompts, max_new_tokens=5, temperature=0.9, seed=2, logprobs=True, reuse_cache=False)
    for p, c in zip(prompts, completions):
        seq = p + c.ids
        logp = log_softmax(demo.logits(seq, reuse_cache=False).astype(np.float64))  # (seq, vocab)
        want = [logp[len(p) - 1 + i, t] for i, t in enumerate(c.ids)]
        np.testing.assert_allclose(c.logprobs, want, rtol=1e-5, atol=1e-5)


def test_logprobs_are_those_of_the_model_not_of_the_penalised_distribution(demo):
    prompt = [1, 365, 263, 931]
    plain = fresh(demo, prompt, max_new_tokens=6, temperature=0, logprobs=True)
    shaped = fresh(demo, prompt, max_new_tokens=6, temperature=0, logprobs=True, repetition_penalty=3.0,
                   presence_penalty=2.0, logit_bias={plain.ids[0]: -5.0})
    assert shaped.ids != plain.ids
    seq = prompt + shaped.ids
    logp = log_softmax(demo.logits(seq, reuse_cache=False).astype(np.float64))
    want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(shaped.ids)]
    np.testing.assert_allclose(shaped.logprobs, want, rtol=1e-5, atol=1e-5)


def test_config_and_keywords(demo):
    cfg = GenerationConfig(max_new_tokens=6, temperature=0)
    assert demo.generate("Once", config=cfg) == demo.generate("Once", max_new_tokens=6, temperature=0)
    assert demo.generate("Once", config=cfg, max_new_tokens=3) == demo.generate("Once", max_new_tokens=3,
                                                                                temperature=0)
    chat = [{"role": "user", "content": "Hello"}]
    assert demo.chat(chat, config=cfg) == demo.chat(chat, max_new_tokens=6, temperature=0)
    with pytest.raises(InputError, match="unknown generation option 'temprature'"):
        demo.chat(chat, temprature=0)
    with pytest.raises(InputError, match="config must be a GenerationConfig"):
        demo.generate("Once", config={"temperature": 0})
    with pytest.raises(InputError, match="one prompt takes one seed"):
        new_request(demo.model, demo.tokenizer, "Once", GenerationConfig(seed=[1, 2]))


def test_the_generation_docs_examples_run(monkeypatch, capsys):
    import re

    repo = DEMO.parents[1]
    monkeypatch.chdir(repo)
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", (repo / "docs" / "generation.md").read_text(), flags=re.S):
        exec(compile(block, "docs/generation.md", "exec"), namespace)
    assert capsys.readouterr().out and namespace["decoder"].stats.forward_passes > 0
