"""Speculative decoding (prompt lookup, draft models): same tokens, same distribution, less work."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO, shared_path
from llama2np import InputError, Llama2, Transformer
from llama2np.generation import drafting, generate as generation
from llama2np.loaders import load_checkpoint
from tiny_model import tiny_args, tiny_model, tiny_state

STORY = "Once upon a time, there was a little girl named Lily."
REPEAT = ("Tom had a red ball. He liked to play with the ball in the park. Tom had a red ball. He liked to play "
          "with the ball in the park. Tom had a red ball.")


def fewer_layers(path: Path, n_layers: int) -> Llama2:
    """The checkpoint's first n_layers layers (its own embedding, norm and output): a draft sharing its vocabulary."""
    ckpt = load_checkpoint(path)
    args = type(ckpt.args)(**{**ckpt.args.to_params(), "n_layers": n_layers})
    return Llama2(Transformer(args, ckpt.state))


def plain(model: Llama2, prompt, n: int, **kw):
    return model.generate(prompt, max_new_tokens=n, temperature=0, reuse_cache=False, **kw)


# --- greedy: token-identical ------------------------------------------------------------


@pytest.mark.parametrize("ngram", [1, 3])
def test_prompt_lookup_greedy_equals_plain_greedy_on_stories260K(stories, ngram):
    prompts = [STORY, REPEAT, "Lily and Tom", "The cat sat on the mat. The cat sat on the", ""]
    drafted = accepted = 0
    for prompt in prompts:
        ids = stories.tokenizer.encode(prompt, bos=True)
        expected = plain(stories, ids, 100)  # greedy: a shorter run is a prefix of it
        for n in (1, 7, 100):
            assert stories.generate(ids, max_new_tokens=n, temperature=0, prompt_lookup=ngram) == \
                expected[:n], (prompt, n)
            drafted, accepted = drafted + stories.last_stats.drafted, accepted + stories.last_stats.accepted
    assert drafted > accepted > 0  # drafts were checked, some kept, some rolled back


def test_draft_model_greedy_equals_plain_greedy_on_stories260K(stories):
    draft = fewer_layers(shared_path("stories260K", "stories260K.bin"), 2)
    for prompt in (STORY, REPEAT, "Lily and Tom"):
        expected = plain(stories, prompt, 50)
        for k in (1, 3, 6):
            assert stories.generate(prompt, max_new_tokens=50, temperature=0, draft_model=draft, num_draft=k) == \
                expected, (prompt, k)
            assert 0 < stories.last_stats.accepted < stories.last_stats.drafted


def test_prompt_lookup_and_draft_model_greedy_on_the_demo_model(demo):
    draft = fewer_layers(DEMO, 2)
    for prompt in (STORY, REPEAT):
        expected = plain(demo, prompt, 30)
        assert demo.generate(prompt, max_new_tokens=30, temperature=0, prompt_lookup=2) == expected
        assert demo.generate(prompt, max_new_tokens=30, temperature=0, draft_model=draft, num_draft=4) == expected
        assert demo.last_stats.accepted > 0


@pytest.mark.parametrize("storage", ["float32", "bf16"])  # bf16: the tiled path 7B decodes through
def test_random_model_with_a_fewer_layer_draft(monkeypatch, storage):
    from llama2np.model.storage import float32_to_bf16
    monkeypatch.setattr(generation, "LLAMA_EOS", -1)
    args = tiny_args(max_seq_len=64)
    deep = type(args)(**{**args.to_params(), "n_layers": 4})
    state = tiny_state(deep, seed=5)
    if storage == "bf16":
        state = {k: float32_to_bf16(v) if v.ndim == 2 else v for k, v in state.items()}
    target = Llama2(Transformer(deep, state))
    draft = Llama2(Transformer(args, state))  # its first two layers
    rng = np.random.default_rng(0)
    for _ in range(7):
        prompt = [1] + rng.integers(3, args.vocab_size, size=int(rng.integers(1, 20))).tolist()
        n = int(rng.integers(1, 40))
        for kw in ({}, dict(repetition_penalty=1.3, logit_bias={7: 2.0}), dict(presence_penalty=0.5)):
            expected = plain(target, prompt, n, **kw)
            assert target.generate(prompt, max_new_tokens=n, temperature=0, draft_model=draft, num_draft=3,
                                   **kw) == expected
            assert target.generate(prompt, max_new_tokens=n, temperature=0, prompt_lookup=2, **kw) == expected


def test_batch_stop_logprobs_and_streaming_with_prompt_lookup(stories):
    prompts = [REPEAT, STORY, "Tom"]
    assert stories.generate(prompts, max_new_tokens=30, temperature=0, prompt_lookup=2) == \
        [plain(stories, p, 30) for p in prompts]
    stop = plain(stories, REPEAT, 60).split()[4]
    want = plain(stories, REPEAT, 60, stop=[stop], logprobs=True)
    got = stories.generate(REPEAT, max_new_tokens=60, temperature=0, stop=[stop], logprobs=True, prompt_lookup=3)
    assert (got.ids, got.text, got.finish_reason) == (want.ids, want.text, want.finish_reason) == \
        (want.ids, want.text, "stop")
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    stream = stories.generate(REPEAT, max_new_tokens=60, temperature=0, stream=True, prompt_lookup=3)
    assert "".join(stream) == plain(stories, REPEAT, 60)
    assert stream.stats.accepted > 0 and "tokens/pass" in stream.stats.summary()


def test_sampling_with_prompt_lookup_reproduces_with_a_seed(stories):
    kw = dict(max_new_tokens=40, temperature=0.8, top_k=20, seed=3, prompt_lookup=2)
    assert stories.generate(REPEAT, **kw) == stories.generate(REPEAT, **kw)


# --- sampling: the model's distribution ----------------------------------------------------


def exact_marginals(model: Llama2, prompt: list[int], temperature: float, top_k: int) -> list[np.ndarray]:
    """p(token 2) and p(token 3) after ``prompt``, by summing over every path under the filtered distributions."""
    from llama2np import GenerationConfig as SamplingParams
    from llama2np.generation.sampling import filtered_probs
    params = SamplingParams(temperature, 1.0, top_k)
    V = model.args.vocab_size
    p1 = filtered_probs(model.logits(prompt, reuse_cache=False)[-1:], params)[0]  # (V,)
    seq2 = np.array([prompt + [a] for a in range(V)])
    p2 = filtered_probs(model.logits(seq2, reuse_cache=False)[:, -1], params)  # (V, V): [t1, t2]
    joint12 = p1[:, None] * p2
    seq3 = np.array([prompt + [a, b] for a in range(V) for b in range(V)])
    p3 = filtered_probs(model.logits(seq3, reuse_cache=False)[:, -1], params).reshape(V, V, V)
    return [joint12.sum(0), (joint12[:, :, None] * p3).sum((0, 1))]


def chi2_excess(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic over its 99.9% critical value (Wilson-Hilferty): > 1 rejects the distribution."""
    n = counts.sum()
    keep = probs * n >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat / critical


def sampled_marginals(model: Llama2, prompt, n_seeds: int, **kw) -> list[np.ndarray]:
    V = model.args.vocab_size
    counts = [np.zeros(V), np.zeros(V)]
    model.drafted = model.accepted = 0
    for seed in range(n_seeds):
        out = model.generate(prompt, max_new_tokens=3, temperature=1.3, top_p=1.0, top_k=8, seed=seed, **kw)
        counts[0][out[1]] += 1
        counts[1][out[2]] += 1
        model.drafted += model.last_stats.drafted
        model.accepted += model.last_stats.accepted
    return counts


@pytest.fixture()
def small_vocab(monkeypatch):
    monkeypatch.setattr(generation, "LLAMA_EOS", -1)
    args = tiny_args(vocab_size=12)
    target = tiny_model(args, seed=2)
    one_layer = type(args)(**{**args.to_params(), "n_layers": 1})
    return target, Llama2(Transformer(one_layer, tiny_state(args, seed=2)))  # a draft that often disagrees


def test_draft_model_sampling_keeps_the_models_distribution(small_vocab, monkeypatch):
    target, draft = small_vocab
    prompt = [1, 5, 9]
    exact = exact_marginals(target, prompt, 1.3, 8)
    for counts, probs in zip(sampled_marginals(target, prompt, 1000, draft_model=draft, num_draft=2), exact):
        assert chi2_excess(counts, probs) < 1
    assert 0.15 * target.drafted < target.accepted < 0.85 * target.drafted  # both branches taken often
    # the bound has teeth: accepting every draft token (the draft's distribution) fails it
    monkeypatch.setattr(drafting, "accept", lambda p_x, q_x, rng: rng.random() < 2)
    wrong = sampled_marginals(target, prompt, 500, draft_model=draft, num_draft=2)
    assert max(chi2_excess(c, p) for c, p in zip(wrong, exact)) > 1


def test_prompt_lookup_sampling_keeps_the_models_distribution(small_vocab, monkeypatch):
    target, _ = small_vocab
    prompt = [1, 10, 7, 10, 7, 10]  # after 7 or 10 the lookup drafts "10 7" or "7 10"; about half is kept
    exact = exact_marginals(target, prompt, 1.3, 8)
    for counts, probs in zip(sampled_marginals(target, prompt, 1000, prompt_lookup=1, num_draft=2), exact):
        assert chi2_excess(counts, probs) < 1
    assert 0.15 * target.drafted < target.accepted < 0.85 * target.drafted
    # accepting a copied token with probability p(x) and not resampling it afterwards is wrong
    monkeypatch.setattr(drafting, "accept", lambda p_x, q_x, rng: rng.random() < math.sqrt(p_x))
    wrong = sampled_marginals(target, prompt, 500, prompt_lookup=1, num_draft=2)
    assert max(chi2_excess(c, p) for c, p in zip(wrong, exact)) > 1


# --- arguments, and the lookup itself ---------------------------------------------------------


def test_bad_speculative_arguments_are_input_errors(stories):
    for kw, word in ((dict(prompt_lookup=0), "prompt_lookup"), (dict(prompt_lookup=1.5), "prompt_lookup"),
                     (dict(prompt_lookup=2, num_draft=0), "num_draft"), (dict(num_draft=3), "num_draft"),
                     (dict(prompt_lookup=2, draft_model=stories), "not both"),
                     (dict(draft_model=tiny_model()), "vocabulary"), (dict(draft_model=3), "draft_model"),
                     (dict(reuse_cache="yes"), "reuse_cache")):
        with pytest.raises(InputError, match=word):
            stories.generate("Once", max_new_tokens=3, **kw)


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    def brute(ids, n_max, k):  # the definition, spelled out
        for n in range(min(n_max, len(ids) - 1), 0, -1):
            for start in range(len(ids) - 1 - n, -1, -1):  # latest first; must end before the last token
                if ids[start:start + n] == ids[-n:]:
                    return ids[start + n:start + n + k]
        return []

    rng = np.random.default_rng(1)
    for _ in range(300):
        ids = rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist()
        n_max, k = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        assert drafting.PromptLookup(n_max).propose(ids, k, None, None, [], [])[0] == brute(ids, n_max, k), ids
    assert drafting.PromptLookup(3).propose([5, 1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 4, None, None, [], [])[0] == [9, 2, 3, 7]
