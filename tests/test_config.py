"""GenerationConfig: every option checked once, when the object is built, as an InputError naming it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llama2np import GenerationConfig, InputError

BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("temperature", True), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", 2.5), ("min_p", -0.1),
    ("min_p", 1.1), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("frequency_penalty", float("nan")), ("presence_penalty", float("-inf")), ("logit_bias", [1, 2]),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"a": 1.0}), ("logit_bias", {3: float("inf")}),
    ("max_new_tokens", -1), ("max_new_tokens", 1.0), ("stop", 5), ("stop", [""]), ("stop", ["a", 3]),
    ("stop", "\ud800"), ("seed", -1), ("seed", 1.5), ("seed", [1, "x"]), ("logprobs", 1), ("echo", "yes"),
    ("prompt_lookup", 0), ("num_draft", 0), ("num_draft", 1.5),
]


@pytest.mark.parametrize("field, value", BAD)
def test_a_bad_value_is_an_input_error_naming_the_field(field, value):
    with pytest.raises(InputError, match=field.replace("logit_bias", "logit_bias|stop string")):
        GenerationConfig(**{field: value})
    with pytest.raises(InputError, match=field.replace("logit_bias", "logit_bias|stop string")):
        GenerationConfig().replace(**{field: value})  # replace checks again


def test_values_are_normalised():
    c = GenerationConfig(temperature=np.float32(0.5), top_k=np.int64(4), stop="\n", seed=[np.int64(1), 2],
                         logit_bias={np.int64(7): np.float32(-1)}, logprobs=np.bool_(True))
    assert c.temperature == 0.5 and type(c.temperature) is float and type(c.top_k) is int
    assert c.stop == ("\n",) and c.seed == (1, 2) and c.logit_bias == {7: -1.0} and c.logprobs is True
    assert GenerationConfig(temperature=0).greedy and not GenerationConfig().greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.temperature = 1.0  # type: ignore[misc]


def test_unknown_options_and_vocabulary():
    with pytest.raises(InputError, match="unknown generation option 'temp'"):
        GenerationConfig().replace(temp=1)
    GenerationConfig(logit_bias={99: 1.0}).check_vocab(100)
    with pytest.raises(InputError, match=r"logit_bias key 100 .*\[0, 100\)"):
        GenerationConfig(logit_bias={100: 1.0}).check_vocab(100)
