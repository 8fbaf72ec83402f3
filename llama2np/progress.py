"""Progress bars for long work: loading, long forward passes, perplexity windows.

``tqdm.auto`` draws a widget in Jupyter (a text bar there when ipywidgets is not
installed) and a bar on a terminal. By default (``progress=None``) bars show only
on a terminal or in a notebook, never in logs or pipes, and only once the work
has taken longer than ``DELAY`` seconds, so short calls print nothing;
``progress=True`` shows them at once, anywhere.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

DELAY = 1.0  # seconds before a bar appears


def in_notebook() -> bool:
    """Whether this Python is a Jupyter kernel (the test tqdm.auto itself makes)."""
    return "ipykernel.zmqshell" in sys.modules


def enabled(progress: bool | None) -> bool:
    """progress=True/False forces bars on/off; None shows them on a terminal or in a notebook."""
    if progress is not None:
        return bool(progress)
    stderr = sys.stderr
    return in_notebook() or (stderr is not None and hasattr(stderr, "isatty") and stderr.isatty())


def bar(items: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
        progress: bool | None = None):
    """A tqdm.auto bar over ``items`` (or with ``total`` steps to ``update``), or None when bars are off.

    Given ``items`` and bars off, returns ``items`` itself.
    """
    if not enabled(progress):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, delay=0 if progress else DELAY, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def layer_callback(n_layers: int, n_tokens: int, progress: bool | None) -> Callable[[int], None] | None:
    """A per-layer callback for ``Transformer.forward``: ticks a bar that appears if the forward is long.

    For prefills and whole-sequence forwards only (a decode step is never long enough to
    matter, and stays free of it). None when bars are off. The bar closes after the last layer.
    """
    b = bar(total=n_layers, desc=f"forward pass, {n_tokens} tokens", unit="layer", progress=progress)
    if b is None:
        return None

    def on_layer(i: int) -> None:
        b.update(1)
        if i == n_layers - 1:
            b.close()

    return on_layer
