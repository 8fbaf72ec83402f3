"""llama2.c's ``.bin`` checkpoint: a 7-int header followed by raw float32 arrays.

Header (little-endian int32): dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len. A negative vocab_size means a separate classifier
(``wcls``) follows the other weights; otherwise the output layer shares the
token embedding. The weights are stored per kind, all layers stacked, in
Meta's layout (wq/wk rows already in interleaved-pair RoPE order):

    token_embedding (vocab, dim)   rms_att (L, dim)        wq (L, dim, dim)
    wk (L, kv_dim, dim)            wv (L, kv_dim, dim)     wo (L, dim, dim)
    rms_ffn (L, dim)               w1 (L, hidden, dim)     w2 (L, dim, hidden)
    w3 (L, hidden, dim)            rms_final (dim,)
    freq_cis_real, freq_cis_imag (seq_len, head_dim / 2)   [legacy, skipped]
    wcls (vocab, dim)              [only when vocab_size < 0]

The whole file is one memory map; every tensor is a view into it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.args import ModelArgs
from .common import make_args

HEADER = np.dtype([(name, "<i4") for name in
                   ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")])


def read_header(path: Path) -> dict[str, int] | None:
    """The 7 header ints, or None when the file is too short to hold them."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.itemsize)
    if len(raw) < HEADER.itemsize:
        return None
    return {name: int(v) for name, v in zip(HEADER.names, np.frombuffer(raw, HEADER)[0])}


def _layout(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of every float32 array after the header, in file order."""
    d, hidden, L, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    head_dim = d // h["n_heads"]
    kv = h["n_kv_heads"] * head_dim
    arrays = [("tok_embeddings", (vocab, d)), ("attention_norm", (L, d)), ("wq", (L, d, d)),
              ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)), ("ffn_norm", (L, d)),
              ("w1", (L, hidden, d)), ("w2", (L, d, hidden)), ("w3", (L, hidden, d)), ("norm", (d,)),
              ("freq_cis_real", (h["seq_len"], head_dim // 2)), ("freq_cis_imag", (h["seq_len"], head_dim // 2))]
    if h["vocab_size"] < 0:
        arrays.append(("output", (vocab, d)))
    return arrays


def _header_problems(h: dict[str, int]) -> list[str]:
    """What makes a header not a model shape, each naming its field (none: plausible)."""
    problems = [f"{k}={h[k]} must be positive" for k in
                ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len") if h[k] <= 0]
    if h["vocab_size"] == 0:
        problems.append("vocab_size=0 (negative: a separate classifier; positive: tied)")
    if not problems and h["dim"] % h["n_heads"]:
        problems.append(f"dim={h['dim']} is not divisible by n_heads={h['n_heads']}")
    if not problems and h["n_heads"] % h["n_kv_heads"]:
        problems.append(f"n_heads={h['n_heads']} is not a multiple of n_kv_heads={h['n_kv_heads']}")
    return problems


def expected_size(h: dict[str, int]) -> int:
    """File size in bytes a header implies."""
    return HEADER.itemsize + 4 * sum(int(np.prod(shape)) for _, shape in _layout(h))


def is_llama2c_file(path: Path) -> bool:
    """A file whose header is plausible and implies exactly its size."""
    if not path.is_file() or zipfile.is_zipfile(path):
        return False
    h = read_header(path)
    return h is not None and not _header_problems(h) and expected_size(h) == path.stat().st_size


def looks_like_llama2c(path: Path) -> bool:
    """A non-zip ``.bin`` file: meant to be llama2.c, so a size mismatch is an error worth naming."""
    return path.is_file() and path.suffix == ".bin" and not zipfile.is_zipfile(path)


def find_llama2c_file(directory: Path) -> Path | None:
    """The one llama2.c checkpoint in ``directory``, if there is exactly one."""
    found = [p for p in sorted(directory.glob("*.bin")) if is_llama2c_file(p)]
    return found[0] if len(found) == 1 else None


def load_llama2c(path: Path, max_seq_len: int | None = None) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """(ModelArgs, state dict in Meta naming) for a llama2.c ``.bin`` file, memory-mapped."""
    path = Path(path)
    h = read_header(path)
    if h is None:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too short for a llama2.c header "
                              f"({HEADER.itemsize} bytes): the file is truncated or not a llama2.c checkpoint")
    if problems := _header_problems(h):
        raise CheckpointError(f"{path}: not a llama2.c checkpoint: in the header {h}, {'; '.join(problems)}")
    size, want = path.stat().st_size, expected_size(h)
    if size != want:
        problem = "truncated" if size < want else "has trailing bytes"
        raise CheckpointError(f"{path}: the header {h} implies {want} bytes but the file has {size}: "
                              f"the file is {problem} or not a llama2.c checkpoint")
    params = {"dim": h["dim"], "n_layers": h["n_layers"], "n_heads": h["n_heads"],
              "n_kv_heads": h["n_kv_heads"], "vocab_size": abs(h["vocab_size"]), "hidden_dim": h["hidden_dim"],
              "max_seq_len": h["seq_len"], "norm_eps": 1e-5, "rope_theta": 10000.0}
    args = make_args(params, path, max_seq_len)

    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.itemsize)
    arrays, start = {}, 0
    for kind, shape in _layout(h):
        n = int(np.prod(shape))
        arrays[kind] = data[start:start + n].reshape(shape)
        start += n

    state = {"tok_embeddings.weight": arrays["tok_embeddings"], "norm.weight": arrays["norm"],
             "output.weight": arrays.get("output", arrays["tok_embeddings"])}
    for i in range(args.n_layers):
        for kind in ("wq", "wk", "wv", "wo"):
            state[f"layers.{i}.attention.{kind}.weight"] = arrays[kind][i]
        for kind in ("w1", "w2", "w3"):
            state[f"layers.{i}.feed_forward.{kind}.weight"] = arrays[kind][i]
        state[f"layers.{i}.attention_norm.weight"] = arrays["attention_norm"][i]
        state[f"layers.{i}.ffn_norm.weight"] = arrays["ffn_norm"][i]
    return args, state


def tokenizer_candidates(path: Path) -> list[Path]:
    """tokenizer.model beside the .bin, else the single ``*.model`` there (stories260K ships tok512.model)."""
    directory = path.parent
    candidates = [directory / "tokenizer.model"]
    others = sorted(p for p in directory.glob("*.model") if p.name != "tokenizer.model")
    if len(others) == 1:
        candidates.append(others[0])
    return candidates
