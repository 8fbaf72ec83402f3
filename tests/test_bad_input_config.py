"""Bad configs and checkpoints that disagree with them: one clear error each, never a traceback or a silent load.

Table-driven: (what is written, the error class, a phrase the message must hold). Checkpoints
are written into tmp_path by the torch-free writers in scripts/, or copied from weights/demo.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import DEMO, REPO
from llama2np import CheckpointError, ConfigError, InputError, Llama2, ModelArgs
from llama2np.errors import ContextLengthWarning
from llama2np.loaders import load_checkpoint
from llama2np.loaders.common import expected_shapes
from llama2np.loaders.safetensors_file import open_safetensors
from llama2np.loaders.torch_pickle import load_pth
from llama2np.model.kv_cache import KVCache

from llama2np.testing.writers import write_pth, write_safetensors  # noqa: E402
from llama2np.testing.synthetic import write_hf, write_llama2c, write_meta  # noqa: E402

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)


def filled(name, shape):  # every weight 0.1: a valid model; these tests need no numerics
    return np.ones(shape, np.float32) * 0.1


def write(layout: str, directory) -> str:
    """A small checkpoint of ``layout`` in ``directory``; returns the name of its config file."""
    if layout == "meta":
        write_meta(directory, ARGS, filled, "float32")
        return "params.json"
    write_hf(directory, ARGS, filled, "float32")
    return "config.json"


def edit_config(path, change) -> None:
    """``change``: a dict of keys to set (None: delete the key), or a str: the file's new text."""
    if isinstance(change, str):
        path.write_text(change)
        return
    config = json.loads(path.read_text())
    for key, value in change.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))  # float("inf") / nan are written as Infinity / NaN, as a hand edit might


INF, NAN = float("inf"), float("nan")

# (layout, config change, error, phrase the message must contain)
CONFIG_CASES = {
    "params-is-a-list": ("meta", "[1, 2]", ConfigError, "expected a JSON object of model settings, got a JSON array"),
    "params-is-empty": ("meta", "{}", ConfigError, "missing key(s) dim, n_layers, n_heads"),
    "dim-negative": ("meta", {"dim": -128}, ConfigError, "dim must be a positive integer, got -128"),
    "dim-string": ("meta", {"dim": "32"}, ConfigError, "dim must be a positive integer, got '32'"),
    "n_heads-float": ("meta", {"n_heads": 4.0}, ConfigError, "n_heads must be a positive integer, got 4.0"),
    "n_layers-bool": ("meta", {"n_layers": True}, ConfigError, "n_layers must be a positive integer, got True"),
    "n_kv_heads-list": ("meta", {"n_kv_heads": [2]}, ConfigError, "n_kv_heads must be a positive integer"),
    "multiple_of-zero": ("meta", {"multiple_of": 0}, ConfigError, "multiple_of must be a positive integer"),
    "vocab_size-string": ("meta", {"vocab_size": "64"}, ConfigError, "vocab_size must be an integer"),
    "norm_eps-string": ("meta", {"norm_eps": "tiny"}, ConfigError,
                        "norm_eps must be a positive finite number, got 'tiny'"),
    "norm_eps-zero": ("meta", {"norm_eps": 0}, ConfigError, "norm_eps must be a positive finite number, got 0"),
    "norm_eps-negative": ("meta", {"norm_eps": -1e-5}, ConfigError, "norm_eps must be a positive finite number"),
    "norm_eps-nan": ("meta", {"norm_eps": NAN}, ConfigError, "norm_eps must be a positive finite number, got nan"),
    "norm_eps-infinity": ("meta", {"norm_eps": INF}, ConfigError, "norm_eps must be a positive finite number"),
    "ffn_dim_multiplier-string": ("meta", {"ffn_dim_multiplier": "1.3"}, ConfigError,
                                  "ffn_dim_multiplier must be a positive finite number or null, got '1.3'"),
    "rope_theta-infinity": ("meta", {"rope_theta": INF}, ConfigError,
                            "rope_theta must be a positive finite number, got inf"),
    "rope_theta-string": ("meta", {"rope_theta": "1e4"}, ConfigError, "rope_theta must be a positive finite number"),
    "n_layers-absurd": ("meta", {"n_layers": 10**12}, CheckpointError,
                        "params.json says n_layers=1000000000000 but the checkpoint holds 2 layers"),
    "use_scaled_rope": ("meta", {"use_scaled_rope": True}, ConfigError, "use_scaled_rope is not supported"),
    "max_seq_len-absurd": ("meta", {"max_seq_len": 10**9}, ConfigError, "max_seq_len=1000000000 is absurd"),
    "max_seq_len-float": ("meta", {"max_seq_len": 1e6}, ConfigError, "max_seq_len must be a positive integer"),
    "config-is-a-list": ("hf", "[]", ConfigError, "expected a JSON object of model settings, got a JSON array"),
    "config-is-a-number": ("hf", "3", ConfigError, "got a JSON number"),
    "rope_parameters-list": ("hf", {"rope_parameters": [1]}, ConfigError,
                             "rope_parameters must be a JSON object or null, got [1]"),
    "rope_parameters-theta-infinity": ("hf", {"rope_theta": None, "rope_parameters": {"rope_theta": INF}},
                                       ConfigError, "rope_parameters: rope_theta must be a positive finite number"),
    "rope_theta-infinity-hf": ("hf", {"rope_theta": INF}, ConfigError, "rope_theta must be a positive finite number"),
    "num_hidden_layers-string": ("hf", {"num_hidden_layers": "2"}, ConfigError,
                                 "num_hidden_layers must be a positive integer, got '2'"),
    "hidden_size-negative": ("hf", {"hidden_size": -128}, ConfigError, "hidden_size must be a positive integer"),
    "num_key_value_heads-float": ("hf", {"num_key_value_heads": 2.5}, ConfigError,
                                  "num_key_value_heads must be a positive integer or null, got 2.5"),
    "rms_norm_eps-string": ("hf", {"rms_norm_eps": "tiny"}, ConfigError,
                            "rms_norm_eps must be a positive finite number, got 'tiny'"),
    "rms_norm_eps-nan": ("hf", {"rms_norm_eps": NAN}, ConfigError, "rms_norm_eps must be a positive finite number"),
    "tie_word_embeddings-string": ("hf", {"tie_word_embeddings": "yes"}, ConfigError,
                                   "tie_word_embeddings must be true or false"),
    "model_type-list": ("hf", {"model_type": ["llama"]}, ConfigError, "model_type must be a string"),
    "max_position_embeddings-absurd": ("hf", {"max_position_embeddings": 10**9}, ConfigError,
                                       "max_seq_len=1000000000 is absurd (the limit is 16777216; Llama 2 was "
                                       "trained on 4096) (in config.json, max_seq_len is max_position_embeddings)"),
    "hidden_size-not-divisible": ("hf", {"hidden_size": 30}, ConfigError,
                                  "dim=30 is not divisible by n_heads=4 (in config.json, dim is hidden_size, "
                                  "n_heads is num_attention_heads)"),
    "head_dim-disagrees": ("hf", {"head_dim": 16}, ConfigError,
                           "head_dim=16 but hidden_size / num_attention_heads = 8"),
    "config-missing-keys": ("hf", "{}", ConfigError,
                            "missing key(s) hidden_size, intermediate_size, num_hidden_layers, num_attention_heads"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_a_clear_error(case, tmp_path):
    layout, change, error, phrase = CONFIG_CASES[case]
    config = tmp_path / write(layout, tmp_path)
    edit_config(config, change)
    with pytest.raises(error) as info:
        Llama2.from_pretrained(tmp_path)
    assert phrase in str(info.value)
    assert str(config) in str(info.value)  # the message names the file at fault


# --- max_seq_len: no table sized by it up front; absurd values refused; past training, a warning ----------


@pytest.mark.parametrize("value, phrase", [(10**9, "max_seq_len=1000000000 is absurd"),
                                           (0, "max_seq_len must be a positive integer, got 0"),
                                           (2.5, "max_seq_len must be a positive integer, got 2.5")])
def test_bad_max_seq_len_argument(value, phrase):
    with pytest.raises(InputError) as info:
        Llama2.from_pretrained(DEMO, max_seq_len=value)
    assert phrase in str(info.value) and "params.json" not in str(info.value)  # the caller's value, not the file's


def test_long_max_seq_len_allocates_nothing_up_front_and_warns():
    with pytest.warns(ContextLengthWarning, match="max_seq_len=1000000 is past the 512 positions"):
        model = Llama2.from_pretrained(DEMO, max_seq_len=10**6)
    assert model.args.max_seq_len == 10**6
    assert model.model.rope.table.nbytes == 0
    model.logits([1, 2, 3])
    assert model.model.rope.table.nbytes < 1 << 20  # a few positions' worth, not 10**6 of them


def test_huge_max_seq_len_costs_nothing_until_used():
    """KV caches and the kept logits grow with the positions reached, like the RoPE table."""
    with pytest.warns(ContextLengthWarning):
        model = Llama2.from_pretrained(DEMO, max_seq_len=10**7)
    assert model.logits([1, 2, 3]).shape == (3, model.args.vocab_size)
    assert model.generate([1, 2, 3], max_new_tokens=4, temperature=0)
    kept = model._prefix
    assert kept.max_seq_len == 10**7 and kept.cache.k.shape[3] <= KVCache.INITIAL and len(kept._logits) <= 256


def test_max_seq_len_within_training_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Llama2.from_pretrained(DEMO, max_seq_len=256).args.max_seq_len == 256


# --- a config that leaves tensors unused: every layout ----------------------------------------------------

STATE = {n: np.full(s, 0.1, np.float32) for n, s in expected_shapes(ARGS).items()}

# layout -> writes ARGS' 2-layer checkpoint, then says 1 layer in its config
FEWER_LAYERS = {
    "meta": lambda d: (write_meta(d, ARGS, filled, "float32"), edit_config(d / "params.json", {"n_layers": 1})),
    "meta-2-shards": lambda d: (write_meta(d, ARGS, filled, "float32", n_shards=2),
                                edit_config(d / "params.json", {"n_layers": 1})),
    "hf-safetensors": lambda d: (write_hf(d, ARGS, filled, "float32"),
                                 edit_config(d / "config.json", {"num_hidden_layers": 1})),
    "hf-index": lambda d: (write_hf(d, ARGS, filled, "float32", shard_bytes=20_000),
                           edit_config(d / "config.json", {"num_hidden_layers": 1})),
    "hf-pytorch-bin": lambda d: (write_hf(d, ARGS, filled, "float32", fmt="pytorch"),
                                 edit_config(d / "config.json", {"num_hidden_layers": 1})),
    "hf-pytorch-bin-index": lambda d: (write_hf(d, ARGS, filled, "float32", shard_bytes=20_000, fmt="pytorch"),
                                       edit_config(d / "config.json", {"num_hidden_layers": 1})),
}


@pytest.mark.parametrize("layout", FEWER_LAYERS)
def test_config_with_fewer_layers_than_the_checkpoint(layout, tmp_path):
    FEWER_LAYERS[layout](tmp_path)
    with pytest.raises(ConfigError) as info:
        Llama2.from_pretrained(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / ("params.json" if layout.startswith("meta") else "config.json")))
    assert "unused: layers.1.* (9 tensors); it says n_layers=1 but the checkpoint holds 2 layers" in message


def test_demo_with_params_json_saying_2_of_its_4_layers(tmp_path):
    """Once loaded and ran, giving wrong text."""
    shutil.copy(DEMO / "consolidated.00.pth", tmp_path)
    shutil.copy(DEMO / "params.json", tmp_path)
    edit_config(tmp_path / "params.json", {"n_layers": 2})
    with pytest.raises(ConfigError, match=r"unused: layers\.2\.\*, layers\.3\.\* \(18 tensors\); it "
                                          r"says n_layers=2 but the checkpoint holds 4 layers"):
        Llama2.from_pretrained(tmp_path)


# llama2.c's config is its 7-int header: (field index, value) -> phrase
LLAMA2C_HEADERS = {
    "fewer-layers": (2, 1, "has trailing bytes"),  # no longer matches the file's size
    "more-layers": (2, 3, "the file is truncated"),
    "n_heads-zero": (3, 0, "n_heads=0 must be positive"),
    "dim-negative": (0, -32, "dim=-32 must be positive"),
    "vocab-zero": (5, 0, "vocab_size=0"),
    "n_kv_heads-not-dividing": (4, 3, "n_heads=4 is not a multiple of n_kv_heads=3"),
}


@pytest.mark.parametrize("case", LLAMA2C_HEADERS)
def test_bad_llama2c_header(case, tmp_path):
    field, value, phrase = LLAMA2C_HEADERS[case]
    path = tmp_path / "model.bin"
    write_llama2c(path, ARGS, filled)
    raw = bytearray(path.read_bytes())
    raw[4 * field:4 * field + 4] = value.to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        Llama2.from_pretrained(path)
    assert str(path) in str(info.value) and phrase in str(info.value)


# (layout, extra tensor name) -> a checkpoint holding one tensor the model has no place for
EXTRA = {
    "meta": ("meta", "layers.0.attention.wq.bias"),
    "hf": ("hf", "model.layers.0.self_attn.q_proj.bias"),
    "hf-unknown-top-level": ("hf", "model.extra_head.weight"),
}


@pytest.mark.parametrize("case", EXTRA)
def test_tensor_the_model_has_no_place_for(case, tmp_path):
    layout, extra = EXTRA[case]
    with_extra = dict(STATE, **{extra: np.zeros(ARGS.dim, np.float32)})
    if layout == "meta":
        write_meta(tmp_path, ARGS, filled, "float32")
        write_pth(tmp_path / "consolidated.00.pth", None, state=with_extra)
    else:
        write_hf(tmp_path, ARGS, filled, "float32")
        path = tmp_path / "model.safetensors"
        tensors = {k: np.array(f()) for k, f in open_safetensors(path).items()}
        write_safetensors(path, None, state=dict(tensors, **{extra: np.zeros(ARGS.dim, np.float32)}))
    with pytest.raises(ConfigError, match=rf"unused: {extra.replace('.', '[.]')} \(1 tensor\); it does not "
                                          "describe this checkpoint"):
        Llama2.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_tensors_a_format_carries_unused_are_allowed(layout, tmp_path):
    """Meta's rope.freqs (write_meta writes it) and the rotary inv_freq buffers of older HF exports."""
    write(layout, tmp_path)
    if layout == "hf":
        path = tmp_path / "model.safetensors"
        tensors = {k: np.array(f()) for k, f in open_safetensors(path).items()}
        buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in range(2)}
        write_safetensors(path, None, state=dict(tensors, **buffers))
    else:
        assert "rope.freqs" in load_pth(tmp_path / "consolidated.00.pth")
    assert Llama2.from_pretrained(tmp_path).logits([1, 2]).shape == (2, ARGS.vocab_size)


# --- malformed safetensors header entries -----------------------------------------------------------------

# tensor entry change -> phrase
BAD_ENTRIES = {
    "shape-of-strings": ({"shape": ["32"]}, "shape must be a list of non-negative integers, got ['32']"),
    "shape-of-floats": ({"shape": [32.0]}, "shape must be a list of non-negative integers, got [32.0]"),
    "shape-negative": ({"shape": [-32]}, "shape must be a list of non-negative integers, got [-32]"),
    "shape-not-a-list": ({"shape": 32}, "shape must be a list of non-negative integers, got 32"),
    "shape-of-bools": ({"shape": [True]}, "shape must be a list of non-negative integers, got [True]"),
    "dtype-a-list": ({"dtype": ["F32"]}, "dtype must be a string such as \"F32\", got ['F32']"),
    "dtype-null": ({"dtype": None}, "dtype must be a string"),
    "data_offsets-strings": ({"data_offsets": ["0", "128"]}, "data_offsets must be two non-negative integers"),
    "data_offsets-one": ({"data_offsets": [0]}, "data_offsets must be two non-negative integers"),
    "data_offsets-negative": ({"data_offsets": [-4, 124]}, "data_offsets must be two non-negative integers"),
    "data_offsets-dict": ({"data_offsets": {"begin": 0}}, "data_offsets must be two non-negative integers"),
    "no-dtype": ({"dtype": None, "_drop": "dtype"}, "no dtype in"),
    "entry-a-list": ("[1, 2]", "expected a JSON object with dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_malformed_safetensors_header_entry(case, tmp_path):
    change, phrase = BAD_ENTRIES[case]
    write_hf(tmp_path, ARGS, filled, "float32")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    if isinstance(change, str):
        header[name] = json.loads(change)
    else:
        header[name] = dict(header[name], **{k: v for k, v in change.items() if k != "_drop"})
        header[name].pop(change.get("_drop"), None)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(CheckpointError) as info:
        Llama2.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(path) in message and repr(name) in message and phrase in message


def test_index_naming_files_by_number(tmp_path):
    write_hf(tmp_path, ARGS, filled, "float32", shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {k: 1 for k in weight_map}}))
    with pytest.raises(CheckpointError, match="not a valid weight index"):
        Llama2.from_pretrained(tmp_path)


def test_gguf_block_count_fewer_than_its_blocks(tmp_path):
    pytest.importorskip("gguf")
    raw = bytearray((REPO / "tests" / "golden" / "gguf" / "f32.gguf").read_bytes())
    key = raw.index(b"llama.block_count") + len(b"llama.block_count")
    assert raw[key:key + 8] == (4).to_bytes(4, "little") + (2).to_bytes(4, "little")  # uint32 2
    raw[key + 4:key + 8] = (1).to_bytes(4, "little")
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"unused: layers\.1\.\* \(9 tensors\); it says n_layers=1 but "
                                          r"the checkpoint holds 2 layers"):
        load_checkpoint(path)


def test_tensor_in_two_hf_shards(tmp_path):
    write_hf(tmp_path, ARGS, filled, "float32", shard_bytes=20_000)
    first, second = sorted(tmp_path.glob("model-*.safetensors"))[:2]
    tensors = {k: np.array(f()) for k, f in open_safetensors(second).items()}
    write_safetensors(second, None, state=dict(tensors, **{"model.norm.weight": np.ones(ARGS.dim, np.float32)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' is in both model-0000"):
        Llama2.from_pretrained(tmp_path)
