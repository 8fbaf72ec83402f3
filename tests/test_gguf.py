"""GGUF checkpoints (the ``gguf`` extra): golden logits, every tensor type, the embedded vocabulary, bad files.

Golden files (tests/golden/gguf/, written by scripts/golden/make_gguf_golden.py): the
F32 file must give the HF float64 logits of the layouts model like every other
layout; each file gives the HF float64 logits of the weights gguf's own reader
dequantizes from it. Other GGUFs are written here with scripts/checkpoints/gguf_export.py
(gguf.GGUFWriter, llama.cpp's conventions) and read back tensor by tensor
against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')
from gguf import GGMLQuantizationType as T  # noqa: E402

from conftest import REPO, shared_path  # noqa: E402
from llama2np import CheckpointError, ConfigError, Llama2  # noqa: E402
from llama2np.loaders import load_checkpoint  # noqa: E402
from llama2np.tokenizer import Tokenizer  # noqa: E402
from test_golden import GOLDEN, DTYPES, check_against_reference, load_reference, max_abs_error  # noqa: E402

from llama2np.testing import gguf_export as ge  # noqa: E402

GGUF_MANIFEST = json.loads((GOLDEN / "gguf" / "manifest.json").read_text())


# --- golden logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(GGUF_MANIFEST))
def test_gguf_matches_reference(name: str, dtype: str):
    entry = GGUF_MANIFEST[name]
    ids, reference, meta = load_reference(entry)
    model = Llama2.from_pretrained(GOLDEN / entry["file"], dtype=dtype)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "max_seq_len"):
        assert getattr(model.args, key) == meta[key], f"{name}: {key} = {getattr(model.args, key)}, not {meta[key]}"
    assert model.args.ffn_hidden_dim == meta["hidden_dim"]
    check_against_reference(name, model, ids, reference, dtype)
    if "same_weights_as" in entry:  # the F32 file is the layouts model itself
        _, layouts_reference, _ = load_reference({"reference": entry["same_weights_as"]})
        assert max_abs_error(model.logits(ids), layouts_reference) <= (1e-4 if dtype == "float32" else 1e-9)


def test_golden_files_cover_the_types():
    types = {T[e["type"]] if e["type"] != "Q4_K_M" else "mix" for e in GGUF_MANIFEST.values()}
    assert {T.F32, T.F16, T.Q8_0, "mix"} <= types
    kinds = {t.tensor_type for t in gguf.GGUFReader(GOLDEN / GGUF_MANIFEST["gguf/q4_k_m"]["file"]).tensors}
    assert {T.Q4_K, T.Q6_K, T.F32} <= kinds


def test_layout_is_detected():
    path = GOLDEN / GGUF_MANIFEST["gguf/q8_0"]["file"]
    assert load_checkpoint(path).layout == "gguf"


# --- every tensor type round-trips --------------------------------------------------------------

SMALL = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=48, context_length=32)
WIDE = ge.HParams(dim=256, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=256, vocab_size=16, context_length=32)


def independent(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as gguf's reader and dequantizer give it, float32 in NumPy order."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = w.reshape(tuple(reversed(t.shape.tolist())))
    return out


# every type gguf can quantize, and k-quants as random blocks (Q4_K_M: Q4_K + Q6_K)
@pytest.mark.parametrize("ftype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "TQ1_0",
                                   "TQ2_0", "Q4_K_M"])
def test_every_type_round_trips(tmp_path: Path, ftype: str):
    block = 256 if ftype == "Q4_K_M" else gguf.GGML_QUANT_SIZES[T[ftype]][0]
    h = WIDE if block > SMALL.dim else SMALL
    types, produce = ge.synthetic(h, ftype, seed=3)
    path = ge.write_gguf(tmp_path / "m.gguf", h, types, produce)
    want = independent(path)
    ckpt = load_checkpoint(path)
    assert (ckpt.args.dim, ckpt.args.n_layers, ckpt.args.ffn_hidden_dim, ckpt.args.vocab_size) == \
        (h.dim, h.n_layers, h.hidden_dim, h.vocab_size)
    for meta_name, qtype in types.items():
        got = ckpt.state[meta_name]
        expected = want[ge.gguf_name(meta_name)]
        if qtype not in (T.F32, T.F16, T.BF16):  # quantized: the values the file stores, unrounded
            got = got[np.arange(got.shape[0])] if got.dtype.names == ("blocks",) else got
            assert got.dtype in (np.float32, np.float64), meta_name
        elif got.dtype.names:  # a bf16 file
            got = (np.asarray(got).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            assert got.dtype == np.dtype({T.F32: "<f4", T.F16: "<f2"}[qtype])
        assert got.shape == expected.shape, meta_name
        np.testing.assert_array_equal(got.astype(np.float32), expected, err_msg=meta_name)
    logits = Llama2.from_pretrained(path).logits([1, 2, 3])
    assert logits.shape == (3, h.vocab_size) and np.isfinite(logits).all()


def test_missing_output_is_tied_to_the_embedding(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce, skip=("output.weight",))
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.state["output.weight"], ckpt.state["tok_embeddings.weight"])


# --- the embedded vocabulary ---------------------------------------------------------------------


def test_embedded_vocabulary_encodes_like_tokenizer_model(tmp_path: Path):
    """Meta's tokenizer.model copied into a GGUF as llama.cpp's converter does, rebuilt, encodes identically."""
    tokenizer_model = shared_path("llama2-tokenizer", "tokenizer.model")
    cases = json.loads(shared_path("reference", "llama2_tokenizer_cases.json").read_text())
    h = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=32, vocab_size=32000, context_length=64)
    types, produce = ge.synthetic(h, "Q8_0")
    path = ge.write_gguf(tmp_path / "vocab.gguf", h, types, produce, tokenizer_model=tokenizer_model)
    model = Llama2.from_pretrained(path)  # no tokenizer.model beside it: the embedded one
    meta = Tokenizer(tokenizer_model)
    texts = [c["text"] for c in cases] + ["  two  spaces", "\n\n\t tab", "3.14159 and 1,000,000", "naïve 日本語 😀",
                                          "\x00\x7f bytes", "   ", "</s> <s> [INST] <<SYS>>", ""]
    for case in cases:
        assert model.tokenizer.encode(case["text"]) == case["ids_with_bos"], case["text"]
    for text in texts:
        ids = meta.encode(text, bos=True, eos=True)
        assert model.tokenizer.encode(text, bos=True, eos=True) == ids, text
        assert model.tokenizer.decode(ids) == meta.decode(ids), text
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id, model.tokenizer.vocab_size) == (1, 2, 32000)


def test_tokenizer_model_beside_the_file_wins(tmp_path: Path):
    tokenizer_model = shared_path("stories260K", "tok512.model")
    h = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=32, vocab_size=512, context_length=64)
    types, produce = ge.synthetic(h, "F16")
    path = ge.write_gguf(tmp_path / "m.gguf", h, types, produce)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    model = Llama2.from_pretrained(path)
    assert model.tokenizer.path == tmp_path / "tokenizer.model"


def test_no_vocabulary_means_ids_only(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    model = Llama2.from_pretrained(ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce))
    assert model.logits([1, 2]).shape == (2, SMALL.vocab_size)
    with pytest.raises(Exception, match="no tokenizer"):
        model.tokenizer


# --- bad files -----------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    types, produce = ge.synthetic(SMALL, "Q8_0")
    return ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(good_file: Path, keep: float):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{good_file}.*truncated"):
        Llama2.from_pretrained(good_file)


def test_not_a_gguf(tmp_path: Path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_wrong_architecture(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce, arch="gpt2")
    with pytest.raises(CheckpointError, match=rf"{path}.*architecture is 'gpt2'"):
        load_checkpoint(path)


def test_unsupported_type(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    types["layers.0.attention.wq.weight"] = T.Q8_1  # gguf cannot dequantize Q8_1
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]
    blocks = np.zeros((SMALL.dim, SMALL.dim // block * size), np.uint8)
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types,
                         lambda n: blocks if n == "layers.0.attention.wq.weight" else produce(n))
    with pytest.raises(CheckpointError, match=rf"{path}.*blk.0.attn_q.weight.*Q8_1"):
        load_checkpoint(path)


def test_missing_hyperparameter(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce, skip_keys=("llama.block_count",))
    with pytest.raises(ConfigError, match=rf"{path}.*llama.block_count"):
        load_checkpoint(path)


def test_shape_disagreeing_with_metadata(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    wrong = ge.HParams(**{**SMALL.__dict__, "hidden_dim": 96})
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce, metadata_from=wrong)
    with pytest.raises(CheckpointError, match=rf"{path}.*feed_forward.w1.weight"):
        load_checkpoint(path)


def test_tensor_the_model_has_no_place_for(tmp_path: Path):
    types, produce = ge.synthetic(SMALL, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", SMALL, types, produce,
                         extra={"blk.0.attn_q.bias": np.zeros(SMALL.dim, np.float32)})
    with pytest.raises(ConfigError, match=r"unused: blk\.0\.attn_q\.bias"):
        load_checkpoint(path)


def test_several_files_in_a_directory(tmp_path: Path, good_file: Path):
    (tmp_path / "other.gguf").write_bytes(good_file.read_bytes())
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        load_checkpoint(tmp_path)
    (tmp_path / "other.gguf").unlink()
    assert load_checkpoint(tmp_path).source == good_file
