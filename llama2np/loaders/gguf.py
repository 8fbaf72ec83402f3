"""llama.cpp's GGUF: one ``.gguf`` file holding metadata, the vocabulary and every tensor.

Read with the ``gguf`` package (llama.cpp's own ``gguf-py``; ``pip install
"llama2np[gguf]"``): its ``GGUFReader`` parses the file and memory-maps the
tensors, its ``gguf.quants.dequantize`` turns quantized blocks into floats.
Nothing of the format is parsed here by hand. The conventions, checked
against llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf-py``:

* Hyper-parameters are ``llama.*`` keys: ``embedding_length`` (dim),
  ``block_count`` (n_layers), ``feed_forward_length`` (hidden_dim),
  ``attention.head_count`` / ``attention.head_count_kv`` (n_heads /
  n_kv_heads, default n_heads), ``attention.layer_norm_rms_epsilon``
  (norm_eps), ``rope.freq_base`` (rope_theta, default 10000) and
  ``context_length`` (max_seq_len); RoPE scaling from ``rope.scaling.type`` /
  ``rope.scaling.factor`` (older files: ``rope.scale_linear``), linear only
  (``rope_scaling_metadata``). GGUF stores them as float32: a float is
  read back as the shortest decimal that rounds to the same float32 (1e-05,
  not 9.99999975e-06), which is the number the model's own config held.
* Tensor names: ``token_embd`` -> ``tok_embeddings``, ``output_norm`` ->
  ``norm``, ``output`` (absent: tied to ``token_embd``, as llama.cpp does),
  ``blk.N.attn_q/attn_k/attn_v/attn_output`` -> ``layers.N.attention.wq/wk/wv/wo``,
  ``blk.N.ffn_gate/ffn_down/ffn_up`` -> ``feed_forward.w1/w2/w3``,
  ``blk.N.attn_norm`` -> ``attention_norm``, ``blk.N.ffn_norm`` -> ``ffn_norm``
  (all with ``.weight``).
* Dimensions: GGUF lists a tensor's dims innermost first (ggml's ``ne``:
  ``ne[0]`` = columns), so ``token_embd`` of a 32000 x 4096 embedding says
  ``[4096, 32000]``. The NumPy shape is the reverse, (32000, 4096), the same
  (out_features, in_features) as Meta's; rows are contiguous, as in C order.
* q/k row order: ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) views each
  head's rows of an HF q_proj/k_proj as (2, head_dim/2) and swaps them to
  (head_dim/2, 2): the exact inverse of the permutation HF's conversion from
  Meta applied, so GGUF holds Meta's interleaved (real, imaginary) RoPE pairs
  (llama.cpp rotates adjacent pairs for the llama architecture), and Meta
  ``.pth`` files were converted without any permutation. There is nothing to
  undo here; the golden tests check it against HF's logits.
* F32, F16 and BF16 tensors are memory-mapped as they are. Tensors of the
  common quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) are decoded
  when the model first asks for them, on our threads, into int8 codes with
  per-block float32 scales and offsets (``model.quant_blocks``, decoded by
  ``gguf_blocks``): exactly the values the file stores, about 1.1-1.5 bytes a
  weight (a 7B Q4_K_M: 7.6 GiB). Other quantized types (IQ*, TQ*, MXFP4...)
  are dequantized with ``gguf.quants`` to float32, its exact values, 4 bytes a
  weight. Nothing is rounded. The file's pages are released as each tensor is
  read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..model.linear import TILE_ELEMENTS
from ..model.mapped import release_pages
from ..model.quant_blocks import BLOCKS_DTYPE
from ..model.storage import BF16
from ..model.threads import num_threads, run_parallel
from .common import LazyStateDict, make_args
from .gguf_blocks import decode_tensor, supported
from .gguf_header import check_gguf_header
from .gguf_rope import rope_scaling_metadata

# GGUF name (after "blk.N.") -> Meta name (after "layers.N.")
LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}

#: ggml types mapped as they are (the others are quantized blocks)
_PLAIN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": BF16}

MAGIC = b"GGUF"


def import_gguf():
    """The ``gguf`` package, or a CheckpointError saying which extra installs it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError('reading GGUF files needs the "gguf" package: pip install "llama2np[gguf]"') from None
    return gguf


def meta_name(gguf_name: str) -> str | None:
    """Meta's name for a GGUF tensor name, or None for a tensor Llama 2 has no place for."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def is_gguf_file(path: Path) -> bool:
    """A file named ``*.gguf``, or any file starting with GGUF's magic bytes."""
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def find_gguf_file(directory: Path) -> Path | None:
    """The one ``.gguf`` file of ``directory``; an error when there are several."""
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{directory}: holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                              "pass the one to load")
    return found[0] if found else None


def open_reader(path: Path):
    """A ``gguf.GGUFReader`` over ``path``; a corrupt or truncated file is a CheckpointError naming it."""
    gguf = import_gguf()
    check_gguf_header(path)  # every count bounded, every tensor's data inside the file, none overlapping
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a readable GGUF file ({size} bytes; {type(e).__name__}: {e}): "
                              "the file is truncated or corrupt") from None


#: what a metadata value must be -> (test, description)
_KINDS = {"int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
          "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
          "str": (lambda v: isinstance(v, str), "a string"),
          "bool": (lambda v: isinstance(v, bool), "true or false"),
          "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
          "numbers": (lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in v), "an array of numbers"),
          "ints": (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                   "an array of integers")}


def metadata(reader, key: str, default: Any = None, kind: str | None = None) -> Any:
    """The value of a metadata key (str, int, float, bool or list), ``default`` when absent.

    ``kind`` (see ``_KINDS``): the value must be of it, else a CheckpointError naming the file and the
    key; a string that is not UTF-8 is one too.
    """
    path = getattr(reader.data, "filename", None) or "the GGUF file"
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        value = field.contents()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: metadata {key} holds text that is not UTF-8 ({e.reason} at byte "
                              f"{e.start})") from None
    except (ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata {key} cannot be read ({e})") from None
    if isinstance(value, float):
        # float32 in the file: the shortest decimal that is the same float32
        value = float(str(np.float32(value)))
    if kind is not None and not _KINDS[kind][0](value):
        shown = repr(value) if not isinstance(value, list) else f"an array starting {value[:3]!r}"
        raise CheckpointError(f"{path}: metadata {key} must be {_KINDS[kind][1]}, got {shown[:80]}")
    return value


def read_args(reader, path: Path, vocab_rows: int, max_seq_len: int | None):
    """ModelArgs from the ``llama.*`` metadata."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; llama2np reads only 'llama' GGUF files")
    required = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
                "hidden_dim": "llama.feed_forward_length", "n_heads": "llama.attention.head_count"}
    missing = [key for key in required.values() if reader.get_field(key) is None]
    if missing:
        raise ConfigError(f"{path}: missing metadata key(s) {', '.join(missing)}")
    params = {name: metadata(reader, key) for name, key in required.items()}
    params.update(n_kv_heads=metadata(reader, "llama.attention.head_count_kv", params["n_heads"]),
                  norm_eps=metadata(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
                  rope_theta=metadata(reader, "llama.rope.freq_base", 10000.0), vocab_size=vocab_rows,
                  max_seq_len=metadata(reader, "llama.context_length", 4096))
    rope = {f.name: metadata(reader, f.name) for f in reader.fields.values() if f.name.startswith("llama.rope.")}
    params.update(rope_scaling_metadata(rope, path))
    args = make_args(params, path, max_seq_len)  # warns past the trained context_length
    rope_dims = metadata(reader, "llama.rope.dimension_count", args.head_dim)
    if rope_dims != args.head_dim:
        raise ConfigError(f"{path}: llama.rope.dimension_count={rope_dims} but embedding_length / head_count = "
                          f"{args.head_dim} (partial RoPE is not Llama 2)")
    return args


def _maker(gguf, tensor) -> tuple[Callable[[], np.ndarray], tuple[int, ...], np.dtype]:
    """(function building the tensor in NumPy, its NumPy shape, its dtype) for one GGUF tensor."""
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ne order -> NumPy order
    data, qtype = tensor.data, tensor.tensor_type
    if qtype.name in _PLAIN:
        dtype = _PLAIN[qtype.name]
        return (lambda: data.view(dtype).reshape(shape)), shape, dtype

    if len(shape) == 2 and supported(qtype.name):
        def decode():
            w = decode_tensor(data, qtype.name, shape, tensor.name)
            release_pages(data)
            return w

        return decode, shape, BLOCKS_DTYPE

    def build() -> np.ndarray:  # a type without an int8 form: gguf's own float32 values, rounded nowhere
        blocks = data.reshape(-1, data.shape[-1])  # (rows, bytes per row)
        out = np.empty((blocks.shape[0], shape[-1]), dtype=np.float32)  # (rows, columns)
        step = max(1, TILE_ELEMENTS // shape[-1])
        starts = range(0, blocks.shape[0], step)

        def work(tiles: Sequence[int]) -> None:  # NumPy releases the GIL: tiles spread over our threads
            for r0 in tiles:
                out[r0:r0 + step] = gguf.quants.dequantize(blocks[r0:r0 + step], qtype)  # (step, columns)

        n = max(1, min(num_threads(), len(starts)))
        run_parallel(work, [starts[i::n] for i in range(n)])
        release_pages(data)
        return out.reshape(shape)

    return build, shape, np.dtype(np.float32)


def _check_type(gguf, tensor, path: Path, checked: set) -> None:
    """Check gguf can dequantize the tensor's type (once per type)."""
    qtype = tensor.tensor_type
    if qtype.name in _PLAIN or supported(qtype.name) or qtype in checked:
        return
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name} has type {qtype.name}, which the installed gguf "
                              "package cannot dequantize (supported: F32, F16, BF16, F64 and the quantized "
                              "types of gguf.quants, e.g. Q8_0, Q4_0, Q4_K, Q6_K)") from None
    checked.add(qtype)


def load_gguf(path: Path, max_seq_len: int | None = None):
    """(ModelArgs, lazily built state dict in Meta naming, the reader) for a ``.gguf`` file."""
    path = Path(path)
    gguf = import_gguf()
    reader = open_reader(path)
    makers, specs, checked = {}, {}, set()
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # per-frequency factors: Llama 3's RoPE scaling
            raise ConfigError(f"{path}: tensor rope_freqs.weight (Llama 3's RoPE frequency scaling) is not supported")
        name = meta_name(tensor.name) or tensor.name  # unknown: kept under its own name, validate reports it
        _check_type(gguf, tensor, path, checked)
        make, shape, dtype = _maker(gguf, tensor)
        makers[name], specs[name] = make, (lambda shape=shape, dtype=dtype: (shape, dtype))
    if "tok_embeddings.weight" not in makers:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    if "output.weight" not in makers:  # llama.cpp ties the output to the embedding when it is absent
        makers["output.weight"] = makers["tok_embeddings.weight"]
        specs["output.weight"] = specs["tok_embeddings.weight"]
    embedding_shape = specs["tok_embeddings.weight"]()[0]
    if len(embedding_shape) != 2:
        raise CheckpointError(f"{path}: token_embd.weight has shape {embedding_shape}; an embedding is "
                              "(vocabulary, dim)")
    vocab_rows = embedding_shape[0]
    args = read_args(reader, path, vocab_rows, max_seq_len)
    return args, LazyStateDict(makers, source=path, specs=specs), reader


def tensor_types(path: Path, max_seq_len: int | None = None):
    """(ModelArgs, {Meta name: GGUF type name}) from a GGUF's header alone (no tensor data read), for ``plan``."""
    path = Path(path)
    reader = open_reader(path)
    types = {meta_name(t.name) or t.name: t.tensor_type.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    return read_args(reader, path, int(embedding.shape[-1]), max_seq_len), types


# --- the embedded vocabulary -------------------------------------------------------------

#: how Meta's Llama 2 tokenizer.model was trained: the flags of its trainer_spec that sentencepiece
#: also reads when encoding (GGUF does not store them; Llama 2's vocabulary always had these)
#: GGUF's token types, numbered as sentencepiece's piece types (normal .. byte); 0 (undefined) is read as normal
_TOKEN_TYPES = range(0, 7)

_LLAMA_TRAINER_FLAGS = dict(split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
                            split_digits=True, treat_whitespace_as_suffix=False, allow_whitespace_only_pieces=True,
                            max_sentencepiece_length=16, unk_surface=" \u2047 ")


def sentencepiece_model(reader, path: Path) -> bytes | None:
    """The GGUF's vocabulary (``tokenizer.ggml.*``) as a serialized sentencepiece ModelProto (None: it has none).

    llama.cpp's converter copies every piece of ``tokenizer.model`` with its score
    and type (GGUF's token types number as sentencepiece's); the BPE model type,
    byte fallback, special ids and the identity normalizer with a dummy prefix are
    restored here, so sentencepiece encodes exactly as with the original file.
    Needs ``protobuf`` (the ``gguf`` extra installs it) for sentencepiece's
    bundled ``sentencepiece_model_pb2``.
    """
    from ..errors import TokenizerError

    path = getattr(reader.data, "filename", None) or path
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind is None and reader.get_field("tokenizer.ggml.tokens") is None:
        return None
    if kind != "llama":
        raise TokenizerError(f"{path}: tokenizer.ggml.model is {kind!r}; only the 'llama' (sentencepiece BPE) "
                             "vocabulary can be rebuilt. Pass tokenizer_path= a tokenizer.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens", [], "strs")
    scores = metadata(reader, "tokenizer.ggml.scores", [0.0] * len(tokens), "numbers")
    types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens), "ints")
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens/scores/token_type are missing or of different lengths "
                             f"({len(tokens)}, {len(scores)}, {len(types)})")
    bad = next((i for i, t in enumerate(types) if t not in _TOKEN_TYPES), None)
    if bad is not None:
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type of token {bad} is {types[bad]}; token types are "
                             f"{min(_TOKEN_TYPES)}..{max(_TOKEN_TYPES)} (undefined, normal, unknown, control, "
                             "user-defined, unused, byte)")
    special = {}
    for key, default in (("unknown", 0), ("bos", 1), ("eos", 2), ("padding", -1)):
        i = metadata(reader, f"tokenizer.ggml.{key}_token_id", default, "int")
        if not (-1 <= i < len(tokens)) or (i == -1 and key != "padding"):
            raise TokenizerError(f"{path}: tokenizer.ggml.{key}_token_id={i} is not a token of the "
                                 f"{len(tokens)}-token vocabulary")
        special[key] = i
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise TokenizerError(f"{path}: rebuilding the embedded vocabulary needs protobuf ({e}): "
                             'pip install "llama2np[gguf]"') from None
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        model.pieces.add(piece=piece, score=float(np.float32(score)), type=int(kind) or 1)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = 6 in types  # byte pieces <0x00>..<0xFF>
    spec.unk_id, spec.bos_id, spec.eos_id = special["unknown"], special["bos"], special["eos"]
    pad = special["padding"]
    spec.pad_id = pad if pad not in (spec.unk_id, spec.bos_id, spec.eos_id) else -1  # Meta's has none
    for key, value in _LLAMA_TRAINER_FLAGS.items():
        setattr(spec, key, value)
    for key in ("unk", "bos", "eos", "pad"):
        i = getattr(spec, f"{key}_id")
        if 0 <= i < len(tokens):
            setattr(spec, f"{key}_piece", tokens[i])
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", metadata(reader, "tokenizer.ggml.add_space_prefix", True, "bool")
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return model.SerializeToString()
