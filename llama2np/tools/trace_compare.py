"""Two traces (see ``trace.py``), array by array and layer by layer: where does the other engine depart?

For every array both traces hold, against the reference b: max |a - b|,
NMSE = sum (a - b)^2 / sum b^2 and the cosine similarity, in float64. The verdict
is the first layer whose output (``hidden_states[i + 1]`` for ``layers.{i}``,
``final_layer_output`` for the last) has an NMSE above the threshold, and within
it the first step over (when the traces hold steps). The default threshold 1e-4
is what llama.cpp's model-conversion checks call excellent (1e-2: good).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from .trace import LAYER_ARRAY, STEPS, TOP

THRESHOLD = 1e-4  # llama.cpp's model-conversion checks: NMSE below 1e-4 is excellent, below 1e-2 good


class TraceFile(Mapping):
    """A trace read lazily: ``trace[name]`` loads that one array (checked) from the ``.npz``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.npz = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{self.path}: not a readable .npz trace ({e})") from None
        if not isinstance(self.npz, np.lib.npyio.NpzFile):
            raise InputError(f"{self.path}: a single .npy array, not an .npz trace")
        self.names = list(self.npz.files)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        try:
            self._check_size(name)
            return self.npz[name]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{self.path}: array {name} cannot be read ({e})") from None

    def _check_size(self, name: str) -> None:
        """InputError when the array's header promises more bytes than its zip member holds (read before
        NumPy allocates what the header asks for)."""
        zf = self.npz.zip
        member = name + ".npy" if name + ".npy" in zf.namelist() else name
        info = zf.getinfo(member)
        with zf.open(info) as f:
            if f.read(6) != b"\x93NUMPY":
                return  # not an .npy: NumPy hands back its bytes, which the checks that follow refuse
            f.seek(0)
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise InputError(f"{self.path}: array {name} is in .npy format {version[0]}.{version[1]}; "
                                 "write it with numpy.save (format 1.0 or 2.0)")
            shape, _, dtype = readers[version](f)
            held = info.file_size - f.tell()
        need = math.prod(shape) * dtype.itemsize
        if need > held:
            raise InputError(f"{self.path}: array {name} is truncated: its header says {shape} {dtype} "
                             f"({need} bytes) but the file holds {held}")

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __str__(self) -> str:
        return str(self.path)


def as_trace(trace, label: str = "", default: str = "trace") -> tuple[Mapping, str]:
    """(the arrays, a label) of a trace given as a path (read lazily) or a dict (labelled ``default``)."""
    if isinstance(trace, (str, Path)):
        return TraceFile(trace), label or str(trace)
    if isinstance(trace, Mapping):
        return trace, label or (str(trace.path) if isinstance(trace, TraceFile) else default)
    raise InputError(f"a trace is the path of an .npz or a dict of arrays, got {type(trace).__name__}")


def _shape_of_trace(trace: Mapping, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, hidden_states) of a trace whose names are all known; InputError naming what is wrong."""
    for name in trace:
        if name not in TOP and not LAYER_ARRAY.fullmatch(name):
            raise InputError(f"{label}: unknown array {name!r} (a trace holds {', '.join(TOP)} and "
                             f"layers.{{i}}.{{{','.join(STEPS)}}})")
    missing = [name for name in ("ids", "hidden_states") if name not in trace]
    if missing:
        raise InputError(f"{label}: missing array(s) {', '.join(missing)}")
    ids, hidden = np.asarray(trace["ids"]), trace["hidden_states"]
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{label}: array ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
    if not np.issubdtype(hidden.dtype, np.floating):
        raise InputError(f"{label}: array hidden_states must be floating point, got {hidden.dtype}")
    if hidden.ndim != 3 or hidden.shape[0] < 2 or hidden.shape[1] != ids.size:
        raise InputError(f"{label}: array hidden_states must be (n_layers + 1, n, dim) with n = len(ids) = {ids.size}, "
                         f"got {hidden.shape}")
    return ids, hidden


def _checked(trace: Mapping, name: str, label: str, n: int, dim: int) -> np.ndarray:
    """An array of the trace, checked for a floating dtype and its expected leading shape."""
    a = np.asarray(trace[name])
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"{label}: array {name} must be floating point, got {a.dtype}")
    step = name.rpartition(".")[2]
    if step == "logits":
        ok, expected = a.ndim == 2 and a.shape[0] == n, f"({n}, vocab)"
    elif step == "q":
        ok, expected = a.ndim == 3 and a.shape[0] == n and a.shape[1] * a.shape[2] == dim, \
            f"({n}, n_heads, head_dim) with n_heads * head_dim = {dim}"
    elif step in ("k", "v"):
        ok, expected = a.ndim == 3 and a.shape[0] == n, f"({n}, n_kv_heads, head_dim)"
    else:
        ok, expected = a.shape == (n, dim), f"({n}, {dim})"
    if not ok:
        raise InputError(f"{label}: array {name} has shape {a.shape}, expected {expected}")
    return a


@dataclass
class Row:
    """One array (or one layer of hidden_states) compared."""

    name: str  # layers.{i}.q, layers.{i} (a layer's output), tok_embeddings, norm, logits
    source: str  # where it is in the files: the array name, or hidden_states[j]
    layer: int | None  # Meta's 0-based layer, None outside the layers
    max_abs_diff: float
    nmse: float
    cosine: float

    def over(self, threshold: float) -> bool:
        return not self.nmse <= threshold  # NaN counts as over

    def to_dict(self) -> dict:
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no inf / NaN)
        return {"name": self.name, "source": self.source, "layer": self.layer,
                "max_abs_diff": finite(self.max_abs_diff), "nmse": finite(self.nmse), "cosine": finite(self.cosine)}


def stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(max |a - b|, NMSE sum (a - b)^2 / sum b^2, cosine) in float64; b is the reference."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf, math.inf, math.nan
    d = a - b
    err, ref = float(d @ d), float(b @ b)
    nmse = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    na, nb = math.sqrt(float(a @ a)), math.sqrt(ref)
    cosine = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return float(np.abs(d).max()), nmse, cosine


@dataclass
class TraceComparison:
    reference: str
    other: str
    n_tokens: int
    n_layers: int
    threshold: float
    rows: list[Row]
    only_in: dict = field(default_factory=dict)  # label -> names the other side lacks

    def layer_outputs(self) -> list[Row]:
        """The rows that judge each layer: its output, in layer order."""
        return [r for r in self.rows if r.layer is not None and r.name == f"layers.{r.layer}"]

    @property
    def first_over(self) -> Row | None:
        """The first layer output (or the embeddings) whose NMSE is above the threshold."""
        judged = [r for r in self.rows if r.name == "tok_embeddings"] + self.layer_outputs()
        return next((r for r in judged if r.over(self.threshold)), None)

    @property
    def first_layer_over(self) -> str | None:
        """``layers.{i}`` of the first layer over the threshold ("tok_embeddings" if already those differ)."""
        row = self.first_over
        return row.name if row is not None else None

    @property
    def first_step_over(self) -> Row | None:
        """Within the first layer over, its first step (layers.{i}.q ...) over the threshold, if steps are traced."""
        row = self.first_over
        if row is None or row.layer is None:
            return None
        steps = [r for r in self.rows if r.layer == row.layer and r.name != row.name]
        return next((r for r in steps if r.over(self.threshold)), None)

    def verdict(self) -> str:
        row, step = self.first_over, self.first_step_over
        if row is None:
            worst = max(self.layer_outputs(), key=lambda r: (not math.isfinite(r.nmse), r.nmse), default=None)
            tail = f" (largest: {worst.name}, NMSE {worst.nmse:.2e})" if worst is not None else ""
            return f"no layer over NMSE {self.threshold:.0e}{tail}"
        where = f", first step over: {step.name}, NMSE {step.nmse:.2e}" if step is not None else ""
        return f"first layer over NMSE {self.threshold:.0e}: {row.name} (NMSE {row.nmse:.2e}{where})"

    def format(self) -> str:
        head = f"{'array':<28} {'from':<24} {'max|d|':>10} {'NMSE':>10} {'cosine':>10}"
        lines = [f"reference: {self.reference}", f"other:     {self.other}",
                 f"{self.n_tokens} tokens, {self.n_layers} layers", head, "-" * len(head)]
        for r in self.rows:
            mark = "  *" if r.over(self.threshold) else ""
            lines.append(f"{r.name:<28} {r.source:<24} {r.max_abs_diff:>10.3e} {r.nmse:>10.3e} {r.cosine:>10.6f}{mark}")
        for label, names in self.only_in.items():
            lines.append(f"only in {label}: {', '.join(names)}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        step = self.first_step_over
        return {"reference": self.reference, "other": self.other, "n_tokens": self.n_tokens,
                "n_layers": self.n_layers, "threshold": self.threshold, "rows": [r.to_dict() for r in self.rows],
                "only_in": self.only_in, "first_layer_over": self.first_layer_over,
                "first_step_over": step.name if step is not None else None, "verdict": self.verdict()}


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not math.isfinite(threshold) or threshold <= 0:
        raise InputError(f"threshold must be a positive number, got {threshold!r}")
    return float(threshold)


def compare_traces(reference, other, threshold: float = THRESHOLD, reference_label: str = "",
                   other_label: str = "") -> TraceComparison:
    """Compare ``other`` with ``reference`` (each a trace path or a dict of arrays), layer by layer."""
    threshold = check_threshold(threshold)
    ref, ref_label = as_trace(reference, reference_label, "reference")
    oth, oth_label = as_trace(other, other_label, "other")
    ref_ids, hidden_r = _shape_of_trace(ref, ref_label)
    oth_ids, hidden_o = _shape_of_trace(oth, oth_label)
    if hidden_o.shape != hidden_r.shape:
        raise InputError(f"{oth_label}: array hidden_states has shape {hidden_o.shape}, the reference's "
                         f"{hidden_r.shape}")
    n_layers, n, dim = hidden_r.shape[0] - 1, hidden_r.shape[1], hidden_r.shape[2]
    for trace, label in ((ref, ref_label), (oth, oth_label)):
        for name in trace:
            m = LAYER_ARRAY.fullmatch(name)
            if m and int(m.group(1)) >= n_layers:
                raise InputError(f"{label}: array {name} is beyond the {n_layers} layers hidden_states has")
    if not np.array_equal(ref_ids, oth_ids):
        t = int(np.flatnonzero(ref_ids != oth_ids)[0])
        raise InputError(f"{oth_label}: array ids differs from the reference's at position {t} "
                         f"({int(oth_ids[t])} vs {int(ref_ids[t])}): the traces are of different tokens")
    rows: list[Row] = []

    def add(name: str, source: str, layer: int | None, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise InputError(f"{oth_label}: array {source} has shape {a.shape}, the reference's {b.shape}")
        rows.append(Row(name, source, layer, *stats(a, b)))

    def pair(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        if name not in ref or name not in oth:
            return None
        return _checked(oth, name, oth_label, n, dim), _checked(ref, name, ref_label, n, dim)

    add("tok_embeddings", "hidden_states[0]", None, hidden_o[0], hidden_r[0])
    final = pair("final_layer_output")
    for i in range(n_layers):
        for step in STEPS:
            if (arrays := pair(f"layers.{i}.{step}")) is not None:
                add(f"layers.{i}.{step}", f"layers.{i}.{step}", i, *arrays)
        if i < n_layers - 1:
            add(f"layers.{i}", f"hidden_states[{i + 1}]", i, hidden_o[i + 1], hidden_r[i + 1])
        elif final is not None:
            add(f"layers.{i}", "final_layer_output", i, *final)
    # Without final_layer_output on both sides the last layer is judged after the final norm.
    add(f"layers.{n_layers - 1}" if final is None else "norm", f"hidden_states[{n_layers}]",
        n_layers - 1 if final is None else None, hidden_o[n_layers], hidden_r[n_layers])
    if (logits := pair("logits")) is not None:
        add("logits", "logits", None, *logits)
    only_in = {label: _summary(set(a) - set(b)) for label, a, b in ((ref_label, ref, oth), (oth_label, oth, ref))
               if set(a) - set(b)}
    return TraceComparison(ref_label, oth_label, n, n_layers, threshold, rows, only_in)


def _summary(names: set[str]) -> list[str]:
    """Names one side lacks, per-layer steps grouped: ["logits", "layers.*.q (2 layers)", ...]."""
    steps = [LAYER_ARRAY.fullmatch(n) for n in names]
    top = [n for n in TOP if n in names]
    counts = {step: sum(1 for m in steps if m and m.group(2) == step) for step in STEPS}
    return top + [f"layers.*.{step} ({k} layer{'s' * (k != 1)})" for step, k in counts.items() if k]
