"""Logits processors (penalties, logit bias) and min-p against Hugging Face's processors' golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llama2np import InputError
from llama2np.cli.commands import main
from llama2np import GenerationConfig
from llama2np.generation.sampling import filtered_probs, process_logits
from tiny_model import tiny_model

GOLDEN = np.load(Path(__file__).parent / "golden" / "sampling.npz")
CASES = sorted({k.split(".")[0] for k in GOLDEN.files})


def case(name: str):
    g = {k.split(".", 1)[1]: GOLDEN[k] for k in GOLDEN.files if k.startswith(name + ".")}
    raw = json.loads(str(g["params"]))
    if "logit_bias" in raw:
        raw["logit_bias"] = {int(k): v for k, v in raw["logit_bias"].items()}
    params = GenerationConfig(**{"temperature": 1.0, "top_p": 1.0, **raw})
    n = int(g["prompt_len"])
    contexts = [(row[:n].tolist(), row[n:].tolist()) for row in g["ids"]]
    return g, params, contexts


@pytest.mark.parametrize("name", CASES)
def test_processors_match_hugging_face(name):
    g, params, contexts = case(name)
    processed = process_logits(g["logits"], params, contexts)
    np.testing.assert_allclose(processed, g["processed"], rtol=1e-6, atol=1e-5)
    if "probs" in g:
        np.testing.assert_allclose(filtered_probs(processed, params), g["probs"], rtol=1e-5, atol=1e-7)
        assert ((filtered_probs(processed, params) == 0) == (g["probs"] == 0)).all()  # same tokens dropped


def test_golden_cases_change_the_logits():
    for name in CASES:
        g, _, _ = case(name)
        if "probs" not in g:
            assert not np.allclose(g["processed"], g["logits"]), name  # the case exercises something


def test_no_processors_leave_logits_alone():
    logits = np.ones((2, 5), np.float32)
    assert process_logits(logits, GenerationConfig(), None) is logits


@pytest.mark.parametrize("kwargs, word", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(frequency_penalty="a"), "frequency_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias key"), (dict(logit_bias={10**6: 1.0}), "logit_bias key"),
    (dict(logit_bias={3: float("nan")}), "logit_bias[3]"), (dict(logit_bias={"a": 1.0}), "logit_bias key"),
])
def test_bad_values_are_input_errors(kwargs, word):
    with pytest.raises(InputError, match=word.replace("[", r"\[")):
        tiny_model().generate([1, 2], max_new_tokens=2, **kwargs)


def test_logit_bias_bans_the_greedy_token():
    model = tiny_model()
    plain = model.generate([1, 5, 9], max_new_tokens=6, temperature=0)
    banned = model.generate([1, 5, 9], max_new_tokens=6, temperature=0, logit_bias={plain[0]: float("-inf")})
    assert banned[0] != plain[0] and plain[0] not in banned


def test_presence_penalty_stops_repeats_in_greedy():
    model = tiny_model()
    out = model.generate([1, 5, 9], max_new_tokens=20, temperature=0, presence_penalty=1e4)
    assert len(set(out)) == len(out)  # every generated token is penalised out of the argmax afterwards


def test_repetition_penalty_avoids_prompt_tokens():
    model = tiny_model()
    prompt = list(range(1, 40))
    out = model.generate(prompt, max_new_tokens=5, temperature=0, repetition_penalty=1e6)
    assert not set(out) & set(prompt)


def test_cli_flags_reach_the_sampler(tmp_path, capsys):
    from tiny_model import tiny_args, tiny_state, write_llama2c
    path = write_llama2c(tmp_path / "m.bin", tiny_args(), tiny_state(tiny_args()))
    assert main(["generate", "--model", str(path), "--min-p", "2"]) == 2
    assert "error: min_p must be in [0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--repetition-penalty", "-1"]) == 2
    assert "error: repetition_penalty" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--logit-bias", "x=1"]) == 2
    assert "--logit-bias takes TOKEN_ID=BIAS" in capsys.readouterr().err
