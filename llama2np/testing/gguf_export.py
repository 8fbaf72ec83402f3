#!/usr/bin/env python
"""Write Llama 2 models as GGUF with ``gguf.GGUFWriter``, as llama.cpp's converter does (no torch needed; gguf, an optional extra, is imported where used).

Conventions of ``convert_hf_to_gguf.py`` (LlamaModel): architecture "llama";
``llama.*`` hyper-parameters; Meta's tensor names mapped to ``token_embd``,
``blk.N.attn_q`` ...; q/k rows in Meta's interleaved RoPE order (the converter
permutes HF's rotate-half rows back to it, see ``hf_to_gguf_rows``); 1-D
tensors (norms) always F32; 2-D tensors in the chosen type. The vocabulary,
when given a sentencepiece ``tokenizer.model``, is copied piece by piece with
score and type as ``_set_vocab_sentencepiece`` does.

Quantized types the ``gguf`` package can quantize (Q8_0, Q4_0, ...) are made
with ``gguf.quants.quantize``. It has no k-quant quantizer, so k-quant tensors
(``Q4_K``, ``Q6_K``; ``--type Q4_K_M`` mixes them as llama-quantize does) are
*random* blocks with scales chosen for a sensible weight spread: right for
memory and speed measurements and for loader tests that dequantize
independently, not a quantization of any model.

Usage:
    python scripts/checkpoints/gguf_export.py --synthetic 7b --type Q4_K_M --out /tmp/synth-7b-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

if TYPE_CHECKING:  # annotations only; the functions import gguf (an optional extra) when they run
    import gguf
    from gguf import GGMLQuantizationType as T

from ..loaders import gguf as gguf_reader

# Meta name -> GGUF name: the reader's tables (loaders/gguf.py) inverted
LAYER_NAMES = {meta: name for name, meta in gguf_reader.LAYER_NAMES.items()}  # after "layers.N." / "blk.N."
TOP_NAMES = {meta: name for name, meta in gguf_reader.TOP_NAMES.items()}


def gguf_name(meta_name: str) -> str:
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def hf_to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows -> Meta's interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class HParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    context_length: int = 4096


SHAPES = {"7b": HParams(4096, 32, 32, 32, 11008, 32000, 1e-5),
          "1b": HParams(2048, 22, 32, 4, 5632, 32000, 1e-5, 10000.0, 2048)}


def meta_shapes(h: HParams) -> dict[str, tuple[int, ...]]:
    """Every tensor in Meta naming with its (rows, columns) shape, in llama.cpp's file order."""
    kv = h.n_kv_heads * (h.dim // h.n_heads)
    shapes = {"tok_embeddings.weight": (h.vocab_size, h.dim)}
    for i in range(h.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (h.dim,), p + "attention.wq.weight": (h.dim, h.dim),
                       p + "attention.wk.weight": (kv, h.dim), p + "attention.wv.weight": (kv, h.dim),
                       p + "attention.wo.weight": (h.dim, h.dim), p + "ffn_norm.weight": (h.dim,),
                       p + "feed_forward.w1.weight": (h.hidden_dim, h.dim),
                       p + "feed_forward.w2.weight": (h.dim, h.hidden_dim),
                       p + "feed_forward.w3.weight": (h.hidden_dim, h.dim)})
    shapes.update({"norm.weight": (h.dim,), "output.weight": (h.vocab_size, h.dim)})
    return shapes


def q4_k_m_type(meta_name: str, n_layers: int) -> T:
    """llama-quantize's Q4_K_M mix (simplified): Q6_K for output, and for attn_v / ffn_down of the
    first and last eighth of the layers and every third layer between; Q4_K elsewhere."""
    from gguf import GGMLQuantizationType as T
    if meta_name == "output.weight":
        return T.Q6_K
    if meta_name.endswith(("attention.wv.weight", "feed_forward.w2.weight")):
        i = int(meta_name.split(".")[1])
        if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2:
            return T.Q6_K
    return T.Q4_K


def tensor_type(meta_name: str, ftype: str, n_layers: int) -> T:
    from gguf import GGMLQuantizationType as T
    if meta_name.endswith("norm.weight"):
        return T.F32  # llama.cpp keeps 1-D tensors in F32
    if ftype == "Q4_K_M":
        return q4_k_m_type(meta_name, n_layers)
    return T[ftype]


def random_kquant(shape: tuple[int, int], qtype: T, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random k-quant blocks (uint8, (rows, bytes per row)) whose weights spread about ``std``."""
    import gguf
    from gguf import GGMLQuantizationType as T
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    if qtype == T.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit q
        # w = d * sc * q - dmin * m with sc, m ~ 32 and q ~ U{0..15}: std ~ d * 32 * 4.6
        rows[:, :, 0:2] = np.float16(std / 147).reshape(1).view(np.uint8)
        rows[:, :, 2:4] = np.float16(std / 147 * 7.5).reshape(1).view(np.uint8)
    elif qtype == T.Q6_K:  # 128 + 64 bytes of 6-bit q, 16 int8 scales, d (f16) last
        rows[:, :, 208:210] = np.float16(std / 1360).reshape(1).view(np.uint8)  # 74 * 18.5
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return rows.reshape(shape[0], -1)


def encode(a: np.ndarray, qtype: T) -> np.ndarray:
    """A float array as the bytes (or floats) GGUFWriter stores for ``qtype``."""
    import gguf
    from gguf import GGMLQuantizationType as T
    if qtype == T.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(a, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)


def add_vocab(writer: gguf.GGUFWriter, tokenizer_model: Path) -> None:
    """The vocabulary as llama.cpp's _set_vocab_sentencepiece copies it."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i) else
                gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i) else
                gguf.TokenType.NORMAL)
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


#: produce(meta_name) -> the tensor as GGUFWriter stores it (float array, or uint8 blocks for quantized types)
Producer = Callable[[str], np.ndarray]


def write_gguf(path: Path, h: HParams, types: dict[str, T], produce: Producer,
               tokenizer_model: Path | None = None, name: str = "llama2np fixture", arch: str = "llama",
               skip: Iterable[str] = (), skip_keys: Iterable[str] = (), metadata_from: HParams | None = None,
               extra: dict[str, np.ndarray] | None = None,
               extra_keys: dict[str, str | int | float] | None = None) -> Path:
    """Stream a GGUF to ``path``: header, metadata, tensor infos, then one tensor at a time.

    ``skip`` (Meta tensor names), ``skip_keys`` (metadata keys), ``arch``, ``metadata_from`` (other
    hyper-parameters in the metadata than the tensors have) and ``extra`` (float32 tensors under GGUF
    names of their own) let tests write broken files. ``extra_keys``: more metadata (a str as a
    string, an int as uint32, a float as float32), e.g. ``llama.rope.scaling.*``.
    """
    import gguf
    from gguf import GGMLQuantizationType as T
    m = metadata_from or h
    w = gguf.GGUFWriter(path, arch)
    keys = {f"{arch}.context_length": m.context_length, f"{arch}.embedding_length": m.dim,
            f"{arch}.block_count": m.n_layers, f"{arch}.feed_forward_length": m.hidden_dim,
            f"{arch}.rope.dimension_count": m.dim // m.n_heads, f"{arch}.attention.head_count": m.n_heads,
            f"{arch}.attention.head_count_kv": m.n_kv_heads}
    floats = {f"{arch}.attention.layer_norm_rms_epsilon": m.norm_eps, f"{arch}.rope.freq_base": m.rope_theta}
    w.add_name(name)
    for key, value in keys.items():
        if key not in skip_keys:
            w.add_uint32(key, value)
    for key, value in floats.items():
        if key not in skip_keys:
            w.add_float32(key, value)
    for key, value in (extra_keys or {}).items():
        add = w.add_string if isinstance(value, str) else w.add_uint32 if isinstance(value, int) else w.add_float32
        add(key, value)
    if tokenizer_model is not None:
        add_vocab(w, tokenizer_model)
    shapes = {n: s for n, s in meta_shapes(h).items() if n not in skip}
    for meta_name, shape in shapes.items():
        qtype = types[meta_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) * size // block
        if qtype in (T.F32, T.F16):
            w.add_tensor_info(gguf_name(meta_name), shape, np.dtype(np.float32 if qtype == T.F32 else np.float16),
                              nbytes)
        else:
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(gguf_name(meta_name), byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    extra = {n: np.asarray(a, dtype=np.float32) for n, a in (extra or {}).items()}
    for name, a in extra.items():
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for meta_name in shapes:
        w.write_tensor_data(produce(meta_name))
    for a in extra.values():
        w.write_tensor_data(a)
    w.close()
    return path


def synthetic(h: HParams, ftype: str, seed: int = 0) -> tuple[dict[str, T], Producer]:
    """Random weights (embeddings ~N(0, 1), projections ~N(0, 1/in)) in ``ftype``."""
    from gguf import GGMLQuantizationType as T
    shapes = meta_shapes(h)
    types = {n: tensor_type(n, ftype, h.n_layers) for n in shapes}

    def produce(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, list(shapes).index(name)])
        shape, qtype = shapes[name], types[name]
        std = 1.0 if name == "tok_embeddings.weight" else 1 / np.sqrt(shape[-1])
        if len(shape) == 1:
            return (0.5 + rng.random(shape, dtype=np.float32)).astype(np.float32)
        if qtype in (T.Q4_K, T.Q6_K):
            return random_kquant(shape, qtype, std, rng)
        rows = max(1, (64 << 20) // (4 * shape[1]))  # quantize 64 MiB of float32 at a time
        return np.concatenate([encode(rng.standard_normal((min(rows, shape[0] - r), shape[1]), dtype=np.float32)
                                      * np.float32(std), qtype) for r in range(0, shape[0], rows)])

    return types, produce


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", choices=sorted(SHAPES), required=True, help="model shape")
    parser.add_argument("--type", default="Q4_K_M", help="F32, F16, Q8_0, Q4_0 or Q4_K_M (default)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.model to embed as the vocabulary")
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args(argv)
    h = SHAPES[a.synthetic]
    t0 = time.perf_counter()
    types, produce = synthetic(h, a.type)
    write_gguf(a.out, h, types, produce, a.tokenizer, name=f"random {a.synthetic} {a.type}")
    print(f"wrote {a.out}: {a.out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
