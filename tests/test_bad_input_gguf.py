"""Bad GGUF files: counts beyond the file, tensor data out of place, metadata of the wrong type, damaged floats.

Each is one Llama2npError naming the file, never a traceback, a runaway allocation or wrong logits.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')

from bounded import run_bounded  # noqa: E402
from llama2np import CheckpointError, Llama2, Llama2npError, TokenizerError  # noqa: E402
from llama2np.loaders import load_checkpoint  # noqa: E402
from llama2np.testing import gguf_export as ge  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "weights" / "demo" / "tokenizer.model"  # 1024 pieces
SMALL = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=48, context_length=32)
VOCAB = ge.HParams(**{**SMALL.__dict__, "vocab_size": 1024})


def small(tmp_path: Path, ftype: str = "F32", h: ge.HParams = SMALL, **kw) -> Path:
    types, produce = ge.synthetic(h, ftype)
    return ge.write_gguf(tmp_path / "m.gguf", h, types, kw.pop("produce", produce), **kw)


# --- counts beyond the file -------------------------------------------------------------------


def header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


BAD_HEADERS = {
    "53 bytes: an array of 2^62 u32": header(0, 1) + gguf_string(b"gen.x") + struct.pack("<IIQ", 9, 4, 2 ** 62),
    "an array of 2^62 strings": header(0, 1) + gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2 ** 62),
    "2^62 keys": header(0, 2 ** 62),
    "2^62 tensors": header(2 ** 62, 0),
    "a string of 2^62 bytes": header(0, 1) + gguf_string(b"k") + struct.pack("<IQ", 8, 2 ** 62),
    "arrays nested 10000 deep": header(0, 1) + gguf_string(b"k") + struct.pack("<I", 9)
    + struct.pack("<IQ", 9, 1) * 10000 + struct.pack("<IQ", 4, 0),
    "a tensor of 2^40 dimensions": header(1, 0) + gguf_string(b"t") + struct.pack("<I", 2 ** 31),
}


@pytest.mark.parametrize("data", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_counts_are_bounded_by_the_file(tmp_path: Path, data: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    outcome = run_bounded(f"from llama2np.loaders import load_checkpoint; load_checkpoint({str(path)!r})",
                          timeout=60)
    assert outcome.error == "CheckpointError", outcome.message
    assert str(path) in outcome.message


# --- tensor data out of place -------------------------------------------------------------------


def move_tensor(path: Path, name: str, to: str | int) -> None:
    """Rewrite tensor ``name``'s data offset: that of tensor ``to``, or the byte offset ``to``."""
    reader = gguf.GGUFReader(path, "r+")
    tensors = {t.name: t for t in reader.tensors}
    offset = tensors[name].field.parts[5]  # the u64 data offset in the tensor info, memory-mapped
    offset[0] = tensors[to].field.parts[5][0] if isinstance(to, str) else to
    reader.data.flush()
    del reader


def test_overlapping_tensor_data(tmp_path: Path):
    path = small(tmp_path)
    move_tensor(path, "blk.0.attn_k.weight", "blk.0.attn_v.weight")  # same shape: k now reads v's bytes
    with pytest.raises(CheckpointError, match=rf"{path}.*blk.0.attn_[kv].weight.*overlap"):
        load_checkpoint(path)


def test_tensor_data_past_the_end(tmp_path: Path):
    path = small(tmp_path)
    move_tensor(path, "output_norm.weight", path.stat().st_size)
    with pytest.raises(CheckpointError, match=rf"{path}.*output_norm.weight.*runs past the end"):
        load_checkpoint(path)


def test_zero_dimensional_embedding(tmp_path: Path):
    path = small(tmp_path, skip=("tok_embeddings.weight",), extra={"token_embd.weight": np.float32(1.0)})
    with pytest.raises(CheckpointError, match=rf"{path}: token_embd.weight has shape \(\)"):
        load_checkpoint(path)


# --- damaged float16 --------------------------------------------------------------------------


def with_value(produce, name: str, value: float, row: int = 3):
    def make(n: str) -> np.ndarray:
        a = produce(n)
        if n == name:
            a = a.copy()
            a[row, 5] = value
        return a

    return make


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_f16_embedding_holding_inf_or_nan(tmp_path: Path, value: float):
    types, produce = ge.synthetic(SMALL, "F16")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, with_value(produce, "tok_embeddings.weight", value))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor tok_embeddings.weight: .*inf or NaN"):
        Llama2.from_pretrained(path)


def test_f16_matrix_stacked_with_f32_holding_inf(tmp_path: Path):
    """wq in F16, wk and wv in F32: the three are one stacked matrix that is not all float16."""
    types, produce = ge.synthetic(SMALL, "F16")
    for n in ("layers.0.attention.wk.weight", "layers.0.attention.wv.weight"):
        types[n] = gguf.GGMLQuantizationType.F32
    _, f32 = ge.synthetic(SMALL, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, with_value(
        lambda n: f32(n) if types[n] == gguf.GGMLQuantizationType.F32 else produce(n),
        "layers.0.attention.wq.weight", np.inf))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor layers.0.attention.wq.weight: .*inf or NaN"):
        Llama2.from_pretrained(path)
    with pytest.raises(CheckpointError, match="layers.0.attention.wq.weight"):
        Llama2.from_pretrained(path, quantize="int8")


def test_f16_error_names_file_and_tensor(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F16")
    bad = with_value(produce, "layers.0.feed_forward.w2.weight", np.nan)
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, bad)
    with pytest.raises(CheckpointError, match=rf"^{path}: tensor layers.0.feed_forward.w2.weight: "):
        Llama2.from_pretrained(path)


# --- metadata of the wrong type ---------------------------------------------------------------


def vocab_file(tmp_path: Path, monkeypatch, write) -> Path:
    """A GGUF whose tokenizer.ggml.* fields are what ``write(writer)`` adds (instead of a real vocabulary)."""
    monkeypatch.setattr(ge, "add_vocab", lambda w, _: write(w))
    return small(tmp_path, h=VOCAB, tokenizer_model=DEMO_TOKENIZER)


def real_vocab(w, **replace) -> None:
    """The demo tokenizer's vocabulary as llama.cpp writes it, with fields replaced by ``replace``."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    fields = {"tokens": [sp.IdToPiece(i).encode() for i in range(sp.vocab_size())],
              "scores": [sp.GetScore(i) for i in range(sp.vocab_size())],
              "token_type": [6 if sp.IsByte(i) else 3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 1
                             for i in range(sp.vocab_size())],
              "bos_token_id": 1}
    fields.update(replace)
    w.add_tokenizer_model("llama")
    for key, value in fields.items():
        if isinstance(value, str):
            w.add_string(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"tokenizer.ggml.{key}", value)
        else:
            w.add_array(f"tokenizer.ggml.{key}", value)


def test_real_vocabulary_loads(tmp_path: Path, monkeypatch):
    path = vocab_file(tmp_path, monkeypatch, real_vocab)
    model = Llama2.from_pretrained(path)
    assert model.tokenizer.decode(model.tokenizer.encode("once upon a time")) == "once upon a time"


VOCAB_CASES = {
    "a string bos_token_id": (dict(bos_token_id="1"), "bos_token_id must be an integer, got '1'"),
    "a bos_token_id past the vocabulary": (dict(bos_token_id=5000), "bos_token_id=5000 is not a token"),
    "int tokens": (dict(tokens=list(range(1024))), "tokens must be an array of strings"),
    "string scores": (dict(scores=["x"] * 1024), "scores must be an array of numbers"),
    "token_type 99": (dict(token_type=[1] * 1023 + [99]), "token_type of token 1023 is 99"),
    "pieces not UTF-8": (dict(tokens=[b"\xff\xfe"] * 1024), "tokens holds text that is not UTF-8"),
}


@pytest.mark.parametrize("replace, phrase", VOCAB_CASES.values(), ids=VOCAB_CASES.keys())
def test_vocabulary_fields_of_the_wrong_type(tmp_path: Path, monkeypatch, replace: dict, phrase: str):
    path = vocab_file(tmp_path, monkeypatch, lambda w: real_vocab(w, **replace))
    with pytest.raises(Llama2npError, match=str(path)) as e:
        Llama2.from_pretrained(path)
    assert phrase in str(e.value)
    assert isinstance(e.value, (CheckpointError, TokenizerError))


def test_architecture_not_utf8(tmp_path: Path):
    path = small(tmp_path)
    data = path.read_bytes()
    key = gguf_string(b"general.architecture") + struct.pack("<I", 8) + gguf_string(b"llama")
    assert data.count(key) == 1
    path.write_bytes(data.replace(key, key[:-5] + b"\xffllam"))
    with pytest.raises(CheckpointError, match=rf"{path}: metadata general.architecture holds text that is not UTF-8"):
        load_checkpoint(path)
