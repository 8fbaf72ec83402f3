"""Prompts given as NumPy arrays: a flat integer array is a prompt, anything else an InputError naming it."""

from __future__ import annotations

import numpy as np
import pytest

from llama2np import InputError


@pytest.mark.parametrize("prompt, says", [
    (np.array(5), r"flat \(1-D\).*shape \(\)"),
    (np.array([[1, 2], [3, 4]]), r"flat \(1-D\).*shape \(2, 2\)"),
    ([np.array(5)], r"flat \(1-D\).*shape \(\)"),
    (np.array([1.5, 2.0]), "int token ids, got float"),
    (np.array([True, False]), "booleans"),
    (np.array([1, 10**6]), "outside the vocabulary"),
])
def test_an_array_prompt_that_is_not_flat_int_ids_is_an_input_error(demo, prompt, says):
    with pytest.raises(InputError, match=says):
        demo.generate(prompt, max_new_tokens=2, temperature=0)


def test_a_flat_int_array_is_the_same_prompt_as_its_list(demo):
    ids = [1, 365, 263, 931]
    want = demo.generate(ids, max_new_tokens=4, temperature=0)
    assert demo.generate(np.array(ids, dtype=np.int32), max_new_tokens=4, temperature=0) == want
    assert demo.generate([np.array(ids), ids], max_new_tokens=4, temperature=0) == [want, want]
