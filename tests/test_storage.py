"""Storage dtypes: fp16/bf16 pair widening against NumPy's own conversion."""

from __future__ import annotations

import numpy as np

from llama2np.model import storage as tensors_mod


def test_fp16_pairs_widen_to_exactly_numpys_float32_for_every_finite_value():
    """Every finite float16 bit pattern (zeros, subnormals, the largest), in both halves of a pair."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    finite = bits[(bits & 0x7FFF) < 0x7C00]
    pairs = finite | (finite[::-1] << 16)  # each value once in the low (even) and once in the high (odd) half
    want = pairs.view(np.float16).astype(np.float32)  # (even, odd, even, odd, ...)
    even, odd = np.empty_like(pairs), np.empty_like(pairs)
    tensors_mod.fp16_pair_even(pairs, even)
    tensors_mod.fp16_pair_odd(pairs, odd)
    np.testing.assert_array_equal(even.view(np.float32), want[0::2])
    np.testing.assert_array_equal(odd.view(np.float32), want[1::2])


