"""Sampler: greedy is argmax, top-k / top-p keep the right tokens, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np import InputError
from llama2np import GenerationConfig
from llama2np.generation.sampling import filtered_probs, make_rngs, sample


def kept(probs: np.ndarray) -> set[int]:
    return set(np.flatnonzero(probs).tolist())


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 50))
    ids = sample(logits, GenerationConfig(temperature=0.0), make_rngs(0, 6))
    assert ids.tolist() == [int(np.argmax(row)) for row in logits]


def test_temperature_scales_logits():
    logits = np.random.default_rng(1).normal(size=(2, 20))
    for t in (0.5, 1.0, 2.0):
        e = np.exp(logits / t)
        np.testing.assert_allclose(filtered_probs(logits, GenerationConfig(t, 1.0)), e / e.sum(-1, keepdims=True))


def test_top_k_keeps_the_k_likeliest():
    logits = np.random.default_rng(2).normal(size=(3, 40))
    probs = filtered_probs(logits, GenerationConfig(1.0, 1.0, top_k=5))
    for row, p in zip(logits, probs):
        assert kept(p) == set(np.argsort(row)[-5:].tolist())
        np.testing.assert_allclose(p.sum(), 1.0)
        e = np.exp(row)[p > 0]
        np.testing.assert_allclose(p[p > 0], e / e.sum())  # renormalised, ratios unchanged


def test_top_p_is_metas_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 0.7))[0]) == {0, 1}
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 0.85))[0]) == {0, 1, 2}
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 1e-6))[0]) == {0}  # never empty
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 1.0))[0]) == {0, 1, 2, 3}
    np.testing.assert_allclose(filtered_probs(logits, GenerationConfig(1.0, 0.7))[0, :2], [0.625, 0.375])


def test_top_p_keeps_smallest_set_exceeding_p():
    rng = np.random.default_rng(3)
    for _ in range(50):
        logits = rng.normal(size=(1, 30)) * 2
        p = float(rng.uniform(0.05, 0.95))
        probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
        order = np.argsort(-probs)
        n = next(m for m in range(1, 31) if probs[order[:m]].sum() > p)  # brute force
        assert kept(filtered_probs(logits, GenerationConfig(1.0, p))[0]) == set(order[:n].tolist())


def test_top_k_then_top_p():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    # top-k 2 leaves [4/7, 3/7]; top-p 0.5 then keeps only the first
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 0.5, top_k=2))[0]) == {0}
    assert kept(filtered_probs(logits, GenerationConfig(1.0, 0.6, top_k=3))[0]) == {0, 1}


def test_draws_follow_the_distribution_and_stay_in_the_set():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    params, rng = GenerationConfig(1.0, 0.85), make_rngs(11, 1)
    draws = np.array([sample(logits, params, rng)[0] for _ in range(20000)])
    assert set(draws.tolist()) == {0, 1, 2}
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


def test_seeds_reproduce_and_rows_are_independent():
    logits = np.zeros((3, 100))  # uniform
    params = GenerationConfig(1.0, 1.0)

    def draws(seed, batch=3, n=40):
        rngs = make_rngs(seed, batch)
        return np.stack([sample(logits[:batch], params, rngs) for _ in range(n)], axis=1)

    a, b = draws(5), draws(5)
    assert (a == b).all()
    assert (draws(6) != a).any()
    assert (draws(5, batch=1)[0] == a[0]).all()  # row 0 of a batch = alone with the same seed
    assert (draws(6, batch=1)[0] == a[1]).all()  # row i samples with seed + i
    assert (make_rngs([6, 5, 7], 3)[1].random(3) == make_rngs(5, 1)[0].random(3)).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1.5), "max_new_tokens"),
])
def test_bad_sampling_arguments(kwargs, match):
    args = dict(temperature=0.6, top_p=0.9, top_k=None, max_new_tokens=10) | kwargs
    with pytest.raises(InputError, match=match):
        GenerationConfig(**args)


def test_bad_seeds():
    with pytest.raises(InputError, match="seed"):
        GenerationConfig(seed=-1)
    with pytest.raises(InputError, match="2 seeds for 3 prompts"):
        make_rngs([1, 2], 3)


# --- extreme values: what each formula gives in exact arithmetic, never a silent token 0 ------------


def _plain(model, prompt, n, **options):
    return model.generate(prompt, max_new_tokens=n, reuse_cache=False, **options)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    from tiny_model import tiny_model
    model = tiny_model()
    greedy = _plain(model, [1, 5, 9], 8, temperature=0)
    for t in (1e-310, 5e-324, 1e-300):  # logits / t overflows float64
        assert _plain(model, [1, 5, 9], 8, temperature=t, seed=0) == greedy, t
    logits = np.array([[1.0, 3.0, 3.0, -2.0]])  # a tie at the top: each of the two, never the others
    probs = filtered_probs(logits, GenerationConfig(temperature=1e-310, top_p=1.0))
    np.testing.assert_array_equal(probs, [[0.0, 0.5, 0.5, 0.0]])


def test_a_tiny_repetition_penalty_picks_the_likeliest_seen_token():
    logits = np.array([[2.0, 0.5, 3.0, 1.5, -1.0, 4.0]])
    config = GenerationConfig(temperature=0.6, top_p=1.0, repetition_penalty=1e-320)
    # seen 1, 3 (positive: divided into the 1e320s; 3 wins) and 4 (negative: multiplied to ~0)
    ids = [int(sample(logits, config, make_rngs(s, 1), [([1, 3], [4])])[0]) for s in range(20)]
    assert set(ids) == {3}
    assert sample(logits, config.replace(temperature=0.0), [], [([1, 3], [4])])[0] == 3


def test_a_huge_negative_frequency_penalty_picks_the_most_repeated_token():
    logits = np.array([[5.0, 0.0, 1.0, 0.0, 2.0]])
    config = GenerationConfig(temperature=1.0, top_p=1.0, frequency_penalty=-1e308)  # 2e308 for a token seen twice
    ids = [int(sample(logits, config, make_rngs(s, 1), [([0], [2, 4, 2])])[0]) for s in range(20)]
    assert set(ids) == {2}


def test_huge_biases_choose_among_the_biased_tokens():
    from tiny_model import tiny_model
    bias = {7: 1.7e308, 11: 1.7e308}
    out = _plain(tiny_model(), [1, 5, 9], 12, temperature=0.8, top_p=1.0, logit_bias=bias, seed=3)
    assert set(out) <= {7, 11} and len(out) == 12
    logits = np.zeros((1, 20))
    draws = {int(sample(logits, GenerationConfig(temperature=0.6, logit_bias=bias), make_rngs(s, 1), [([], [])])[0])
             for s in range(40)}
    assert draws == {7, 11}  # they tie (the bias swamps the logits' differences): both are drawn


def test_banning_every_token_is_an_input_error():
    from tiny_model import tiny_model
    model = tiny_model()
    ban = {t: float("-inf") for t in range(model.args.vocab_size)}
    for temperature in (0.0, 0.7):
        with pytest.raises(InputError, match="logit_bias bans every token"):
            _plain(model, [1, 5, 9], 3, temperature=temperature, logit_bias=ban)


def test_drawn_probabilities_are_finite_and_sum_to_one_at_extremes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)) * 10
    contexts = [([1, 2, 3], [4, 4, 5])] * 3
    for options in (dict(temperature=1e-310), dict(repetition_penalty=1e-320), dict(repetition_penalty=1e308),
                    dict(frequency_penalty=-1e308), dict(presence_penalty=1.7e308),
                    dict(logit_bias={0: 1.7e308, 1: -1.7e308}), dict(temperature=1e308)):
        config = GenerationConfig(**{"top_p": 1.0, **options})
        from llama2np.generation.sampling import process_scores
        x, e = process_scores(logits, config, contexts)
        p = filtered_probs(x, config, e)
        assert np.isfinite(p).all() and (p >= 0).all(), options
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12, err_msg=str(options))


def test_top_p_keeps_a_tied_token_only_when_the_mass_before_it_is_at_most_p():
    logits = np.zeros((1, 4))  # four tokens of exactly 1/4: the masses before them are 0, 1/4, 1/2, 3/4
    # Meta's rule drops a token when the mass before it is strictly more than p: at equality it stays
    assert kept(filtered_probs(logits, GenerationConfig(temperature=1.0, top_p=0.5))[0]) == {0, 1, 2}
    assert kept(filtered_probs(logits, GenerationConfig(temperature=1.0, top_p=0.25))[0]) == {0, 1}
    assert kept(filtered_probs(logits, GenerationConfig(temperature=1.0, top_p=0.2499))[0]) == {0}


def test_min_p_applies_after_top_p():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    # top_p 0.6 keeps 0.4, 0.3 (mass before 0.2 is 0.7 > 0.6); renormalised 4/7, 3/7; min_p 0.8 then drops 3/7
    both = GenerationConfig(temperature=1.0, top_p=0.6, min_p=0.8)
    np.testing.assert_array_equal(filtered_probs(logits, both)[0], [1.0, 0.0, 0.0, 0.0])
    # min_p alone (0.4 x 0.8 = 0.32 > 0.3) would keep the same one; with min_p 0.7 it keeps two
    np.testing.assert_allclose(filtered_probs(logits, both.replace(min_p=0.7))[0], [4 / 7, 3 / 7, 0, 0])
