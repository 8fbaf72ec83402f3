"""Speculative decoding (prompt lookup, draft models) and KV reuse: same tokens, same distribution, less work."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_path
from llama2np import InputError, Llama2, Transformer
from llama2np.generation import drafting, generate as generation
from llama2np.generation.chat import dialog_tokens
from llama2np.loaders import load_checkpoint
from llama2np.generation.prefix_cache import PrefixCache
from llama2np.generation.sampling import log_softmax
from tiny_model import tiny_args, tiny_model, tiny_state

DEMO = REPO / "weights" / "demo"
STORY = "Once upon a time, there was a little girl named Lily."
REPEAT = ("Tom had a red ball. He liked to play with the ball in the park. Tom had a red ball. He liked to play "
          "with the ball in the park. Tom had a red ball.")


@pytest.fixture(scope="module")
def stories() -> Llama2:
    return Llama2.from_pretrained(shared_path("stories260K", "stories260K.bin"),
                                  tokenizer_path=shared_path("stories260K", "tok512.model"))


@pytest.fixture(scope="module")
def demo() -> Llama2:
    return Llama2.from_pretrained(DEMO)


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


# --- the KV cache: rollback and reuse --------------------------------------------------------


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
    assert demo.chat(turn2, max_new_tokens=12, temperature=0) == \
        demo.chat(turn2, max_new_tokens=12, temperature=0, reuse_cache=False)
    again = demo.chat(turn2, max_new_tokens=12, temperature=0, reuse_cache=True)
    demo.clear_cache()
    demo.chat(turn1, max_new_tokens=12, temperature=0)
    demo.chat(turn2, max_new_tokens=12, temperature=0)
    second = demo.last_stats
    total = len(dialog_tokens(demo.tokenizer, turn2))
    new_turn = len(demo.tokenizer.encode("[INST] And a dog? [/INST]", bos=True)) + 1  # + the first turn's EOS
    assert second.cached_tokens + second.prompt_tokens == total
    assert second.prompt_tokens <= new_turn + 3  # at most a few re-tokenised pieces of the answer's end
    assert again == answer or isinstance(again, str)


def test_bad_speculative_arguments_are_input_errors(stories):
    for kw, word in ((dict(prompt_lookup=0), "prompt_lookup"), (dict(prompt_lookup=1.5), "prompt_lookup"),
                     (dict(prompt_lookup=2, num_draft=0), "num_draft"), (dict(num_draft=3), "num_draft"),
                     (dict(prompt_lookup=2, draft_model=stories), "not both"),
                     (dict(draft_model=tiny_model()), "vocabulary"), (dict(draft_model=3), "draft_model"),
                     (dict(reuse_cache="yes"), "reuse_cache")):
        with pytest.raises(InputError, match=word):
            stories.generate("Once", max_new_tokens=3, **kw)


def test_speculative_bench_runs(tmp_path):
    """scripts/bench/bench.py --speculative runs end to end on small models (its figures are printed, never asserted)."""
    import subprocess
    import sys
    bench = [sys.executable, str(REPO / "scripts" / "bench" / "bench.py"), "--speculative"]
    costs = tmp_path / "costs.json"
    proc = subprocess.run(bench + ["positions", str(DEMO), "--sizes", "1,2", "--runs", "1", "--save", str(costs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "forward over  2 positions" in proc.stdout, proc.stderr
    proc = subprocess.run(bench + ["lookup", str(DEMO), "--new-tokens", "6", "--runs", "1", "--num-draft", "2",
                                   "--costs", str(costs)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("identical") == 3 and "DIFFERENT" not in proc.stdout, proc.stdout


def test_cli_prompt_lookup_and_draft_model_print_the_same_text_and_their_counts(capsys):
    from llama2np.cli.commands import main
    bin_, tok = shared_path("stories260K", "stories260K.bin"), shared_path("stories260K", "tok512.model")
    base = ["generate", "--model", str(bin_), "--tokenizer", str(tok), "--prompt", REPEAT, "--temperature", "0",
            "--max-new-tokens", "40"]
    assert main(base) == 0
    plain_out = capsys.readouterr().out
    for extra in (["--prompt-lookup", "2", "--num-draft", "3"], ["--draft-model", str(bin_)]):
        assert main(base + extra) == 0
        out, err = capsys.readouterr()
        assert out == plain_out and "forward passes" in err and "tokens/pass" in err and "accepted" in err
    assert main(base + ["--num-draft", "2"]) == 2
    assert "num_draft needs a drafter" in capsys.readouterr().err


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
