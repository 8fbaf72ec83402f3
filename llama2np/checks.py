"""Type checks shared by every module that takes values from a caller: Python or NumPy numbers, never bools."""

from __future__ import annotations

import numpy as np


def is_int(x) -> bool:
    """An integer as a caller may hold one (``int`` or a NumPy integer); ``True``/``False`` are not."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x) -> bool:
    """A real number (int, float or their NumPy kinds); bools are not."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
