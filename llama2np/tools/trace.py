"""Reference activations, layer by layer: a trace of one forward pass written to an ``.npz``.

A trace holds what another engine needs to find where it departs from this one
(Hugging Face's ``output_hidden_states`` convention for ``hidden_states``):

    ids                 (n,)                     int64    the tokens, BOS first
    hidden_states       (n_layers + 1, n, dim)   float    [0] the token embeddings; [i] (1 <= i < n_layers)
                                                          the residual stream after layer i - 1; [n_layers]
                                                          the output of the final RMSNorm
    final_layer_output  (n, dim)                 float    the last layer's residual stream, before the norm
    logits              (n, vocab)               float    as ``Llama2.logits``

and with ``steps="all"``, for every layer i, the output of each step of the block:

    layers.{i}.attention_norm  (n, dim)                  RMSNorm before attention
    layers.{i}.q, layers.{i}.k (n, heads | kv_heads, head_dim)   after RoPE, Meta's interleaved pairs
    layers.{i}.v               (n, kv_heads, head_dim)
    layers.{i}.attention       (n, dim)                  the output of wo, before the residual add
    layers.{i}.ffn_norm        (n, dim)                  RMSNorm before the feed-forward
    layers.{i}.feed_forward    (n, dim)                  the output of w2, before the residual add

The model reports each array through its ``observer`` hooks as the forward pass
reaches it; the writer puts the per-layer arrays into the zip at once and the
rows of ``hidden_states`` into a temporary ``.npy`` copied in at the end, so
memory holds one layer's arrays, never the whole trace.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from ..errors import InputError
from ..model.transformer import Attention, Transformer
from ..progress import layer_callback
from .logits_file import NpyWriter

STEPS = ("attention_norm", "q", "k", "v", "attention", "ffn_norm", "feed_forward")  # the block's order
TOP = ("ids", "hidden_states", "final_layer_output", "logits")
LAYER_ARRAY = re.compile(r"layers\.(0|[1-9]\d{0,5})\.(" + "|".join(STEPS) + r")")


def check_steps(steps) -> str:
    if steps not in ("hidden", "all"):
        raise InputError(f'steps must be "hidden" or "all", got {steps!r}')
    return steps


def check_dtype(model: Transformer, dtype) -> np.dtype:
    """The dtype arrays are written in: the compute dtype by default, or float16/32/64."""
    if dtype is None:
        return model.dtype
    try:
        out = np.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype must be float16, float32 or float64, got {dtype!r}") from None
    if out not in (np.float16, np.float32, np.float64):
        raise InputError(f"dtype must be float16, float32 or float64, got {dtype!r}")
    return out


@contextlib.contextmanager
def observing(model: Transformer, observer: Callable[[str, np.ndarray], None], steps: str) -> Iterator[None]:
    """Within the block, ``model.forward`` calls ``observer(name, array)`` with each array a trace holds,
    named as in the file ("tok_embeddings", "layers.{i}.q", ..., "layers.{i}", "norm"); arrays keep
    the batch axis. steps="hidden": only the embeddings, the layers' outputs and the norm."""
    if steps == "all" and not all(isinstance(layer.attention, Attention) for layer in model.layers):
        raise InputError('steps="all" needs q, k and v, which tensor-parallel actors compute out of the '
                         'driver\'s sight: trace steps="hidden" (the driver assembles it), or load the model '
                         "without tensor_parallel")
    hooked = [model]
    model.observer = observer
    try:
        if steps == "all":
            for i, layer in enumerate(model.layers):
                def prefixed(name, value, p=f"layers.{i}."):
                    observer(p + name, value)
                layer.observer = layer.attention.observer = prefixed
                hooked += [layer, layer.attention]
        yield
    finally:
        for obj in hooked:
            obj.observer = None


def run_trace(model: Transformer, ids: np.ndarray, steps: str, put: Callable[[str, np.ndarray], None],
              put_hidden: Callable[[int, np.ndarray], None], progress: bool | None = None) -> None:
    """One forward pass over ``ids`` (n,), every array handed on as it is computed: ``put(name, array)``
    for the per-layer arrays, ``final_layer_output`` and ``logits``; ``put_hidden(j, rows)`` for
    ``hidden_states[j]`` in order j = 0 .. n_layers. A progress bar counts layers."""
    last = f"layers.{model.args.n_layers - 1}"

    def observer(name: str, value: np.ndarray) -> None:
        value = value[0]  # the batch of one
        if name == "tok_embeddings":
            put_hidden(0, value)
        elif name == "norm":
            put_hidden(model.args.n_layers, value)
        elif name == last:
            put("final_layer_output", value)
        elif name.count(".") == 1:  # layers.{i}: the residual stream after layer i
            put_hidden(int(name.split(".")[1]) + 1, value)
        else:
            put(name, value)

    on_layer = layer_callback(model.args.n_layers, ids.size, progress)
    with observing(model, observer, steps):
        logits = model.forward(ids[None], on_layer=on_layer)[0]  # (n, vocab)
    put("logits", logits)


def trace_arrays(model: Transformer, ids: np.ndarray, steps: str = "hidden", dtype=None,
                 progress: bool | None = None) -> dict[str, np.ndarray]:
    """The trace as a dict of arrays in memory (small models; ``write_trace`` streams to a file)."""
    steps, dtype = check_steps(steps), check_dtype(model, dtype)
    ids = np.asarray(ids, dtype=np.int64)
    out = {"ids": ids}
    hidden = np.empty((model.args.n_layers + 1, ids.size, model.args.dim), dtype=dtype)

    def put(name, value):
        out[name] = value.astype(dtype, copy=True)

    def put_hidden(j, value):
        hidden[j] = value

    run_trace(model, ids, steps, put, put_hidden, progress)
    out["hidden_states"] = hidden
    return out


def write_trace(model: Transformer, ids: np.ndarray, out: BinaryIO, steps: str = "hidden", dtype=None,
                progress: bool | None = None) -> list[str]:
    """Run the trace and write the ``.npz`` to the binary file ``out``; returns the array names written."""
    steps, dtype = check_steps(steps), check_dtype(model, dtype)
    ids = np.asarray(ids, dtype=np.int64)
    names = []
    with tempfile.TemporaryDirectory(prefix="llama2np-trace-") as tmp, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
            open(Path(tmp) / "hidden_states.npy", "w+b") as hidden_file:

        def put(name: str, value: np.ndarray) -> None:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value, dtype=dtype), allow_pickle=False)
            names.append(name)

        hidden = NpyWriter(hidden_file, (model.args.n_layers + 1, ids.size, model.args.dim), dtype)

        def put_hidden(j: int, value: np.ndarray) -> None:
            assert hidden.rows == j * ids.size, "hidden states arrive in order"
            hidden.append(value)

        with zf.open("ids.npy", "w") as member:  # int64, whatever dtype the floats are written in
            np.lib.format.write_array(member, ids, allow_pickle=False)
        names.append("ids")
        run_trace(model, ids, steps, put, put_hidden, progress)
        hidden_file.seek(0)
        with zf.open("hidden_states.npy", "w", force_zip64=True) as member:
            while chunk := hidden_file.read(16 << 20):
                member.write(chunk)
        names.append("hidden_states")
    return names
