"""Checkpoint loaders: layout detection, the llama2.c / HF / Meta readers, and every bad-input error.

Tiny checkpoints are written into tmp_path with the torch-free writers in
scripts/ (no torch here). Cross-layout tests compare each loader against the
model built straight from the state dict it was written from; the numeric
golden comparison against HF transformers lives in test_golden.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_path
from llama2np import CheckpointError, ConfigError, Llama2, Llama2npError, ModelArgs, TokenizerError, Transformer
from llama2np.loaders import load_checkpoint
from llama2np.loaders.common import expected_shapes
from llama2np.model.storage import float32_to_bf16

from llama2np.testing.writers import (BF16, PROTO, REDUCE, STOP, op_global, op_str, op_tuple,  # noqa: E402
                                      write_pth, write_safetensors)
from llama2np.testing.synthetic import write_hf, write_llama2c, write_meta  # noqa: E402

# hidden size 96, derived from dim and multiple_of as Meta's params.json implies
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)
IDS = [1, 5, 9, 33, 2, 17]


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal(shape) * (0.3 if len(shape) > 1 else 0.1) + (len(shape) == 1))
            .astype(np.float32) for name, shape in expected_shapes(ARGS).items()}


def source_of(state, dtype="float32"):
    if dtype == "bfloat16":
        return lambda name, shape: float32_to_bf16(state[name]) if name in state else float32_to_bf16(
            np.ones(shape, np.float32))
    return lambda name, shape: state[name] if name in state else np.ones(shape, np.float32)


def reference_logits(state) -> np.ndarray:
    return Transformer(ARGS, state, "float32").forward(np.array([IDS]))[0]


# --- every layout loads to the same model ----------------------------------------------------------

WRITERS = {
    "meta": lambda d, s, t: write_meta(d, ARGS, s, t, n_shards=1),
    "meta-2-shards": lambda d, s, t: write_meta(d, ARGS, s, t, n_shards=2),
    "hf": lambda d, s, t: write_hf(d, ARGS, s, t),
    "hf-sharded": lambda d, s, t: write_hf(d, ARGS, s, t, shard_bytes=20_000),
    "hf-pytorch-bin": lambda d, s, t: write_hf(d, ARGS, s, t, shard_bytes=20_000, fmt="pytorch"),
}


@pytest.mark.parametrize("layout", WRITERS)
def test_layouts_load_to_the_same_model(layout, state, tmp_path):
    WRITERS[layout](tmp_path, source_of(state), "float32")
    ckpt = load_checkpoint(tmp_path, progress=False)
    assert ckpt.layout == layout.split("-")[0]
    model = Llama2.from_pretrained(tmp_path)
    np.testing.assert_allclose(model.logits(IDS), reference_logits(state), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["meta-2-shards", "hf-sharded"])
def test_bf16_checkpoints_stay_bf16_and_match(layout, state, tmp_path):
    WRITERS[layout](tmp_path, source_of(state, "bfloat16"), "bfloat16")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state["layers.0.attention.wq.weight"].dtype == BF16  # unpermuted / merged, still bf16
    rounded = {k: float32_to_bf16(v) for k, v in state.items()}
    expected = Transformer(ARGS, rounded, "float32").forward(np.array([IDS]))[0]
    np.testing.assert_allclose(Llama2.from_pretrained(tmp_path).logits(IDS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_classifier_tied_or_separate(tied, state, tmp_path):
    st = dict(state, **{"output.weight": state["tok_embeddings.weight"]}) if tied else state
    write_llama2c(tmp_path / "model.bin", ARGS, source_of(st), tied=tied)
    ckpt = load_checkpoint(tmp_path / "model.bin")
    assert ckpt.layout == "llama2c" and ckpt.args.ffn_hidden_dim == ARGS.ffn_hidden_dim
    assert (ckpt.state["output.weight"] is ckpt.state["tok_embeddings.weight"]) == tied
    np.testing.assert_allclose(Llama2.from_pretrained(tmp_path).logits(IDS), reference_logits(st), atol=1e-5)


def test_a_file_inside_a_checkpoint_dir_loads_the_dir(state, tmp_path):
    write_hf(tmp_path / "hf", ARGS, source_of(state), "float32")
    write_meta(tmp_path / "meta", ARGS, source_of(state), "float32")
    assert load_checkpoint(tmp_path / "hf" / "model.safetensors").source == tmp_path / "hf"
    assert load_checkpoint(tmp_path / "meta" / "consolidated.00.pth").source == tmp_path / "meta"


def rewrite_safetensors(path: Path, edit) -> None:
    """Rewrite a .safetensors file with ``edit(dict of arrays)`` applied."""
    from llama2np.loaders.safetensors_file import open_safetensors
    tensors = {k: np.array(f()) for k, f in open_safetensors(path).items()}
    write_safetensors(path, None, state=edit(tensors))


def test_tied_hf_embeddings_without_lm_head(state, tmp_path):
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    rewrite_safetensors(tmp_path / "model.safetensors",
                        lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match="output.weight"):  # untied config: the head is missing
        load_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    ckpt = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.state["output.weight"], state["tok_embeddings.weight"])


def test_stories260k_loads_through_llama2c_path():
    path = shared_path("stories260K", "stories260K.bin")
    ckpt = load_checkpoint(path)
    assert ckpt.layout == "llama2c"
    assert (ckpt.args.dim, ckpt.args.n_layers, ckpt.args.n_kv_heads, ckpt.args.vocab_size) == (64, 5, 4, 512)
    assert ckpt.state["output.weight"] is ckpt.state["tok_embeddings.weight"]  # positive vocab: tied
    model = Llama2.from_pretrained(path.parent)  # the directory works too, and finds tok512.model
    assert model.tokenizer.path.name == "tok512.model"
    logits = model.logits(model.tokenizer.encode("Once upon a time"))
    assert logits.shape == (5, 512) and np.isfinite(logits).all()


def test_progress_bar_only_when_asked(state, tmp_path, capsys):
    write_meta(tmp_path, ARGS, source_of(state), "float32", n_shards=2)
    load_checkpoint(tmp_path, progress=False)
    assert "loading shards" not in capsys.readouterr().err
    load_checkpoint(tmp_path, progress=True)
    assert "loading shards" in capsys.readouterr().err


# --- bad input: each a clear llama2np error naming the file and the problem -----------------------

def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("layout,file", [("meta", "consolidated.00.pth"), ("hf", "model.safetensors")])
def test_truncated_file(layout, file, state, tmp_path):
    WRITERS[layout](tmp_path, source_of(state), "float32")
    truncate(tmp_path / file)
    with pytest.raises(CheckpointError, match=rf"{file}.*truncated"):
        Llama2.from_pretrained(tmp_path)


def test_truncated_llama2c_file(state, tmp_path):
    write_llama2c(tmp_path / "model.bin", ARGS, source_of(state))
    truncate(tmp_path / "model.bin", 0.9)
    with pytest.raises(CheckpointError, match=r"model\.bin.*truncated"):
        Llama2.from_pretrained(tmp_path / "model.bin")


def test_truncated_pth_storage_member(state, tmp_path):
    """The zip directory survives but a tensor's bytes do not: caught before any read."""
    write_meta(tmp_path, ARGS, source_of(state), "float32")
    path = tmp_path / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    import zipfile
    with zipfile.ZipFile(path) as zf:
        last = max(zf.infolist(), key=lambda i: i.header_offset if "/data/" in i.filename else -1)
    path.write_bytes(bytes(data[:last.header_offset + 100]))  # cut inside the last storage
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("layout,remove,match", [
    ("meta-2-shards", "consolidated.00.pth", "consolidated.00.pth"),
    ("meta-2-shards", "consolidated.01.pth", "shard is missing"),
    ("hf-sharded", "model-00002-of-{n}.safetensors", "model-00002-of"),
])
def test_missing_shard(layout, remove, match, state, tmp_path):
    WRITERS[layout](tmp_path, source_of(state), "float32")
    n = len(list(tmp_path.glob("model-*.safetensors")))
    (tmp_path / remove.format(n=f"{n:05d}")).unlink()
    with pytest.raises(CheckpointError, match=match):
        Llama2.from_pretrained(tmp_path)


def test_missing_tensor_in_safetensors_file(state, tmp_path):
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    rewrite_safetensors(tmp_path / "model.safetensors",
                        lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.feed_forward\.w2\.weight"):
        Llama2.from_pretrained(tmp_path)


def test_missing_tensor_in_pth_file(state, tmp_path):
    write_meta(tmp_path, ARGS, source_of(state), "float32")
    missing = {k: v for k, v in state.items() if k != "layers.1.feed_forward.w2.weight"}
    write_pth(tmp_path / "consolidated.00.pth", None, state=missing)
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.feed_forward\.w2\.weight"):
        Llama2.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_wrong_tensor_shape(layout, state, tmp_path):
    WRITERS[layout](tmp_path, source_of(state), "float32")
    short = np.zeros((ARGS.ffn_hidden_dim - 8, ARGS.dim), np.float32)
    if layout == "meta":
        bad = dict(state, **{"layers.0.feed_forward.w1.weight": short})
        write_pth(tmp_path / "consolidated.00.pth", None, state=bad)
    else:
        rewrite_safetensors(tmp_path / "model.safetensors",
                            lambda t: dict(t, **{"model.layers.0.mlp.gate_proj.weight": short}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.w1\.weight has shape \(88, 32\)"):
        Llama2.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value,error,match", [
    ("num_hidden_layers", 3, CheckpointError, r"missing tensor.*layers\.2\."),
    ("intermediate_size", 64, CheckpointError, r"w1\.weight has shape \(96, 32\).*implies \(64, 32\)"),
    ("num_attention_heads", 8, CheckpointError, r"wk\.weight has shape"),
    ("vocab_size", 100, ConfigError, r"config\.json: vocab_size=100"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, ConfigError, r"config\.json: rope_scaling.* not supported"),
])
def test_config_json_disagreeing_with_tensors(key, value, error, match, state, tmp_path):
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    with pytest.raises(error, match=match):
        Llama2.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value,match", [("dim", 64, "dim=64"), ("n_layers", 3, r"layers\.2\."),
                                             ("vocab_size", 100, "vocab_size=100")])
def test_params_json_disagreeing_with_tensors(key, value, match, state, tmp_path):
    write_meta(tmp_path, ARGS, source_of(state), "float32")
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(dict(params, **{key: value})))
    with pytest.raises(Llama2npError, match=match):
        Llama2.from_pretrained(tmp_path)


def test_unknown_safetensors_dtype(state, tmp_path):
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"F32"', b'"F8_E4M3"', 1)  # same length is not needed: rewrite the size
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* dtype F8_E4M3"):
        Llama2.from_pretrained(tmp_path)


def test_unsupported_pth_dtype(state, tmp_path):
    write_meta(tmp_path, ARGS, source_of(state), "float32")
    ints = dict(state, **{"norm.weight": np.ones(ARGS.dim, np.int32)})
    write_pth(tmp_path / "consolidated.00.pth", None, state=ints)
    with pytest.raises(CheckpointError, match=r"norm\.weight has unsupported dtype int32"):
        Llama2.from_pretrained(tmp_path)


def test_tokenizer_vocab_size_mismatch(state, tmp_path):
    tok = shared_path("stories260K", "tok512.model")  # 512 pieces; the model has 64
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    with pytest.raises(TokenizerError, match=r"tok512\.model: tokenizer has 512 pieces.*vocab_size 64"):
        Llama2.from_pretrained(tmp_path, tokenizer_path=tok)


@pytest.mark.parametrize("make", ["empty-dir", "nonexistent", "junk-file", "config-without-weights"])
def test_no_checkpoint_at_path(make, tmp_path):
    path = tmp_path / "ckpt"
    if make == "empty-dir":
        path.mkdir()
    elif make == "junk-file":
        path.write_bytes(b"not a checkpoint")
    elif make == "config-without-weights":
        path.mkdir()
        (path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=str(path)) as err:
        Llama2.from_pretrained(path)
    if make != "nonexistent":
        assert "Meta directory" in str(err.value) and "Hugging Face" in str(err.value) and "llama2.c" in str(err.value)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = (PROTO + op_global("os", "system") + op_tuple([op_str(f"touch {marker}")]) + REDUCE + STOP)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4}))
    write_pth(ckpt / "consolidated.00.pth", [], lambda spec: [], pickle_bytes=evil)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refusing to load.*os\.system"):
        Llama2.from_pretrained(ckpt)
    assert not marker.exists()


def test_checkpoint_without_tokenizer_still_runs(state, tmp_path):
    ckpt = tmp_path / "model"
    write_hf(ckpt, ARGS, source_of(state), "float32")
    model = Llama2.from_pretrained(ckpt)
    assert model.logits(IDS).shape == (len(IDS), ARGS.vocab_size)
    with pytest.raises(TokenizerError, match=str(ckpt / "tokenizer.model")):
        model.tokenizer


def test_merged_meta_tensor_can_be_built_again(state, tmp_path):
    """Merging drops the shard maps; a tensor released by its consumer is merged again from the files."""
    write_meta(tmp_path, ARGS, source_of(state), "float32", n_shards=2)
    ckpt = load_checkpoint(tmp_path)
    name = "layers.1.attention.wq.weight"
    first = np.array(ckpt.state[name])
    ckpt.state._cache.pop(name, None)  # as LazyStateDict.release does
    np.testing.assert_array_equal(ckpt.state[name], first)
    np.testing.assert_array_equal(first, state[name])


def test_transformers5_rope_parameters_are_read(state, tmp_path):
    """transformers >= 5 saves theta as rope_parameters.rope_theta, not a top-level rope_theta."""
    write_hf(tmp_path, ARGS, source_of(state), "float32")
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Llama2.from_pretrained(tmp_path).args.rope_theta == 500000.0
    config["rope_parameters"]["rope_type"] = "yarn"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        Llama2.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["meta-2-shards", "hf-sharded"])
def test_validation_builds_no_tensor(layout, state, tmp_path):
    """Shapes are checked from the files: no shard is merged (nor q/k unpermuted) before the model asks."""
    WRITERS[layout](tmp_path, source_of(state), "float32")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state._cache == {}
    assert ckpt.state.spec("layers.0.attention.wq.weight") == ((32, 32), np.dtype(np.float32))
    assert ckpt.state.spec("tok_embeddings.weight")[0] == (64, 32)
