"""The one check of a caller's token ids: a flat sequence of integers inside the vocabulary.

Python ints and NumPy integers are ids; ``True``/``False`` are not (NumPy would
silently read them as 1 and 0), nor is a 0-d array (not a sequence at all).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .checks import is_int
from .errors import InputError


def check_token_ids(ids, vocab_size: int, what: str = "the model",
                    range_error: type[Exception] = InputError) -> list[int]:
    """``ids`` as a list of ints, each in [0, vocab_size); InputError naming the first bad one.

    ``what``: who takes the ids, for the message ("decode takes int token ids, got bool True").

    ``range_error``: the error class for an id outside the vocabulary (a tokenizer raises its own).
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InputError(f"{what} takes a flat (1-D) list of int token ids, got an array of shape {ids.shape}")
        if ids.dtype == np.bool_:
            raise InputError(f"{what} takes int token ids, got an array of booleans")
        items: Sequence = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, range)) and not hasattr(ids, "__iter__"):
        raise InputError(f"{what} takes a list of int token ids, got {type(ids).__name__}")
    else:
        items = list(ids)
    odd = next((i for i in items if not is_int(i)), None)
    if odd is not None:
        raise InputError(f"{what} takes int token ids, got {type(odd).__name__} {odd!r}")
    out = [int(i) for i in items]
    bad = next((i for i in out if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise range_error(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out
