"""How far another engine's (or another llama2np model's) logits are from a reference's, position by position.

The reference is a llama2np model, by default in float64. The other side is
either a second ``Transformer`` (a GGUF quantization, ``quantize="int8"``,
float32 ...) run on the same windows, or logits another engine wrote to an
``.npz`` file:

    ids     (n,)        int     the token ids, BOS first as the engine saw them
    logits  (n, vocab)  float   row t: the engine's logits for the token after ids[t]

Per position t: max |logit_ref - logit_other|, KL(ref || other) =
sum_v p_ref(v) (log p_ref(v) - log p_other(v)) in nats (computed in float64),
the top-1 token of each, and each side's negative log-likelihood of ids[t+1].
The summary: max |dlogit|, mean / p50 / p90 / p99 / max KL, top-1 agreement
and the perplexity of each side over ids[1:] (llama.cpp's
``perplexity --kl-divergence`` reports the same kind of figures, against its
own fp16 run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..generation.sampling import log_softmax
from ..model.transformer import Transformer
from .perplexity import check_window, windows


@dataclass
class Comparison:
    """Per-position statistics of one other side against the reference (arrays of length n)."""

    label: str
    ids: np.ndarray  # (n,)
    max_abs_diff: np.ndarray  # (n,) max over the vocabulary of |logit_ref - logit_other|
    kl: np.ndarray  # (n,) KL(ref || other), nats
    top1_ref: np.ndarray  # (n,)
    top1_other: np.ndarray  # (n,)
    nll_ref: np.ndarray  # (n - 1,) -log p_ref(ids[t + 1])
    nll_other: np.ndarray  # (n - 1,)
    summary: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        kl, n = self.kl, len(self.kl)
        self.summary = {
            "label": self.label, "positions": n,
            "max_abs_dlogit": float(self.max_abs_diff.max()),
            "kl_mean": float(kl.mean()), "kl_p50": float(np.percentile(kl, 50)),
            "kl_p90": float(np.percentile(kl, 90)), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float((self.top1_ref == self.top1_other).mean() * 100),
            "perplexity_ref": math.exp(self.nll_ref.mean()) if self.nll_ref.size else float("nan"),
            "perplexity_other": math.exp(self.nll_other.mean()) if self.nll_other.size else float("nan"),
        }

    def positions(self) -> list[dict]:
        """One dict per position: t, id, top-1 of each side, max |dlogit|, KL, each side's NLL of the next id."""
        rows = []
        for t in range(len(self.ids)):
            nxt = t + 1 < len(self.ids)
            rows.append({"t": t, "id": int(self.ids[t]), "top1_ref": int(self.top1_ref[t]),
                         "top1_other": int(self.top1_other[t]), "max_abs_dlogit": float(self.max_abs_diff[t]),
                         "kl": float(self.kl[t]), "nll_ref": float(self.nll_ref[t]) if nxt else None,
                         "nll_other": float(self.nll_other[t]) if nxt else None})
        return rows

    def to_dict(self) -> dict:
        return {"summary": self.summary, "positions": self.positions()}


def position_stats(ref: np.ndarray, other: np.ndarray, next_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of rows of logits: ref, other (k, vocab); next_ids (j,) with j <= k the ids they predict."""
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    logp, logq = log_softmax(ref), log_softmax(other)  # (k, vocab)
    kl = np.maximum((np.exp(logp) * (logp - logq)).sum(axis=-1), 0.0)  # rounding can dip below 0
    rows = np.arange(len(next_ids))
    return {"max_abs_diff": np.abs(ref - other).max(axis=-1), "kl": kl,
            "top1_ref": ref.argmax(axis=-1), "top1_other": other.argmax(axis=-1),
            "nll_ref": -logp[rows, next_ids], "nll_other": -logq[rows, next_ids]}


def read_logits_npz(path: str | Path, vocab_size: int, max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), logits (n, vocab)) from another engine's .npz, checked; an InputError names what is wrong."""
    path = Path(path)
    arrays = read_npz(path, ("ids", "logits", "offsets"))
    missing = [k for k in ("ids", "logits") if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing array(s) {', '.join(missing)} (expected ids (n,) and "
                         f"logits (n, vocab); found {', '.join(arrays) or 'none'})")
    offsets = arrays.get("offsets")
    if offsets is not None and offsets.size > 2:
        raise InputError(f"{path}: holds {offsets.size - 1} prompts (a logits --prompts file); "
                         "compare takes one sequence per file")
    ids, logits = arrays["ids"], arrays["logits"]
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{path}: ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
    if logits.ndim != 2 or logits.shape[0] != ids.size:
        raise InputError(f"{path}: logits must be (n, vocab) with n = len(ids) = {ids.size}, got {logits.shape}")
    if logits.shape[1] != vocab_size:
        raise InputError(f"{path}: logits have {logits.shape[1]} columns but the reference model's vocabulary "
                         f"has {vocab_size} tokens")
    if not np.issubdtype(logits.dtype, np.floating):
        raise InputError(f"{path}: logits must be floating point, got {logits.dtype}")
    bad = np.argwhere(~np.isfinite(logits))
    if bad.size:
        raise InputError(f"{path}: logits hold {len(bad)} NaN/inf value(s), the first at position {bad[0][0]}, "
                         f"token {bad[0][1]}")
    out = ids[(ids < 0) | (ids >= vocab_size)]
    if out.size:
        raise InputError(f"{path}: token id {int(out[0])} is outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64), logits


def read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` (those present) of an ``.npz``; InputError naming the file for anything unreadable.

    Each member's header is read first and its shape checked against the member's size, so a
    header claiming more data than the file holds is refused before anything is allocated.
    """
    try:
        z = np.load(path, allow_pickle=False)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # numpy's parsing of outside bytes: zip errors, EOFError, bad headers ...
        raise InputError(f"{path}: not a readable .npz of ids and logits ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: holds a single .npy array, not an .npz archive of ids and logits")
    out = {}
    with z:
        for name in names:
            if name not in z.files:
                continue
            try:
                info = z.zip.getinfo(f"{name}.npy")
                with z.zip.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                need = math.prod(shape) * dtype.itemsize
                if need > info.file_size:
                    raise InputError(f"{path}: array {name} claims shape {shape} ({need} bytes) but its member "
                                     f"holds {info.file_size} bytes: the file is corrupt")
                out[name] = z[name]
            except InputError:
                raise
            except Exception as e:  # truncated member, CRC or zlib error, a bad header
                raise InputError(f"{path}: array {name} is unreadable ({type(e).__name__}: {e})") from None
    return out


def compare(reference: Transformer, ids: Sequence[int] | np.ndarray, others: dict[str, "Transformer | np.ndarray"],
            window: int | None = None, stride: int | None = None) -> dict[str, Comparison]:
    """Compare each other side (a model, or an (n, vocab) logits array) with ``reference`` over ``ids``.

    Models are read in windows like ``perplexity`` (window: tokens per forward pass, default the
    context length; stride between window starts, default half a window), so a long text works
    and memory holds one window's logits at a time; a logits array is compared as given.
    """
    try:
        ids = np.asarray(ids)
    except ValueError:
        raise InputError("token ids must be a flat list of ints") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"compare needs a non-empty 1-D list of integer token ids, got {ids.dtype} {ids.shape}")
    bad = ids[(ids < 0) | (ids >= reference.args.vocab_size)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {reference.args.vocab_size})")
    ids = ids.astype(np.int64)
    if not others:
        raise InputError("compare needs something to compare with: another model or another engine's logits")
    window, stride = check_window(reference, window, stride)
    for label, other in others.items():
        if isinstance(other, np.ndarray) and other.shape != (ids.size, reference.args.vocab_size):
            raise InputError(f"{label}: logits of shape {other.shape}, expected ({ids.size}, "
                             f"{reference.args.vocab_size})")
        if not isinstance(other, np.ndarray) and other.args.vocab_size != reference.args.vocab_size:
            raise InputError(f"{label}: vocabulary of {other.args.vocab_size} tokens, the reference has "
                             f"{reference.args.vocab_size}")
    parts: dict[str, list[dict]] = {label: [] for label in others}
    for begin, end, first, last in windows(ids.size, window, stride):
        ref = reference.forward(ids[None, begin:end])[0][first - begin:last - begin]  # (last - first, vocab)
        next_ids = ids[first + 1:last + 1]
        for label, other in others.items():
            if not isinstance(other, np.ndarray):  # a model (Transformer, or a tensor-parallel one)
                rows = other.forward(ids[None, begin:end])[0][first - begin:last - begin]
            else:
                rows = other[first:last]
            parts[label].append(position_stats(ref, rows, next_ids))
    return {label: Comparison(label, ids, **{k: np.concatenate([p[k] for p in chunks]) for k in chunks[0]})
            for label, chunks in parts.items()}


# --- printing -------------------------------------------------------------------------------------


def format_summary(results: dict[str, Comparison], reference_label: str) -> str:
    """The summary table: one row per other side."""
    head = (f"{'other':<28} {'n':>5} {'max|dlogit|':>11} {'KL mean':>10} {'KL p50':>10} {'KL p90':>10} "
            f"{'KL p99':>10} {'KL max':>10} {'top-1 %':>8} {'PPL ref':>9} {'PPL other':>9}")
    lines = [f"reference: {reference_label}", head, "-" * len(head)]
    for c in results.values():
        s = c.summary
        lines.append(f"{s['label'][:28]:<28} {s['positions']:>5} {s['max_abs_dlogit']:>11.4g} {s['kl_mean']:>10.3e} "
                     f"{s['kl_p50']:>10.3e} {s['kl_p90']:>10.3e} {s['kl_p99']:>10.3e} {s['kl_max']:>10.3e} "
                     f"{s['top1_agreement']:>8.2f} {s['perplexity_ref']:>9.4f} {s['perplexity_other']:>9.4f}")
    return "\n".join(lines)


def format_positions(c: Comparison, decode=None) -> Iterator[str]:
    """Per-position lines of one comparison (``decode``: id -> text, for readable tokens)."""
    show = (lambda i: repr(decode(i))[:14]) if decode else str
    yield f"{c.label}: per position"
    yield f"{'t':>5} {'id':>14} {'top1 ref':>14} {'top1 other':>14} {'max|dlogit|':>11} {'KL':>10} {'NLL ref':>8} {'NLL oth':>8}"
    for r in c.positions():
        nll = (f"{r['nll_ref']:>8.4f} {r['nll_other']:>8.4f}" if r["nll_ref"] is not None else f"{'':>8} {'':>8}")
        mark = "" if r["top1_ref"] == r["top1_other"] else "  *"
        yield (f"{r['t']:>5} {show(r['id']):>14} {show(r['top1_ref']):>14} {show(r['top1_other']):>14} "
               f"{r['max_abs_dlogit']:>11.4g} {r['kl']:>10.3e} {nll}{mark}")


def summaries(results: dict[str, Comparison]) -> dict:
    """Everything as plain JSON-ready data: a figure that is not finite (a perplexity over no
    predicted token) is null, as JSON has no NaN."""
    return _json_ready({label: c.to_dict() for label, c in results.items()})


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value

