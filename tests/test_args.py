"""ModelArgs: Meta's params.json, the FFN size rule, the published presets, and bad arguments."""

from __future__ import annotations

import json

import pytest

from llama2np import ConfigError, Llama2npError
from llama2np.model.args import PRESETS, ModelArgs

# (hidden size, kv heads, total parameters) of Meta's Llama 2 release
PUBLISHED = {
    "7B": (11008, 32, 6_738_415_616),
    "13B": (13824, 40, 13_015_864_320),
    "70B": (28672, 8, 68_976_648_192),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_the_release(name: str):
    hidden, kv_heads, total = PUBLISHED[name]
    args = PRESETS[name]
    assert args.ffn_hidden_dim == hidden
    assert args.n_kv_heads == kv_heads
    assert args.num_parameters() == total


def test_presets_match_metas_params_json():
    """The params.json files Meta ships (vocab -1, no n_kv_heads below 70B) give the presets."""
    shipped = {
        "7B": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
               "vocab_size": -1},
        "13B": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                "vocab_size": -1},
        "70B": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    }
    for name, params in shipped.items():
        args = ModelArgs.from_params(json.loads(json.dumps(params)), vocab_size=32000)
        preset = PRESETS[name]
        assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == \
               (preset.dim, preset.n_layers, preset.n_heads, preset.n_kv_heads, preset.ffn_hidden_dim)
        assert args.num_parameters() == PUBLISHED[name][2]


def test_params_json_defaults():
    args = ModelArgs.from_params({"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-6,
                                  "vocab_size": -1, "some_future_key": True})
    assert args.n_kv_heads == 4  # absent: one kv head per query head
    assert args.vocab_size == -1  # Meta's placeholder, filled from the embedding by the loader
    assert args.rope_theta == 10000.0
    assert args.norm_eps == 1e-6
    assert args.head_dim == 16 and args.n_rep == 1


@pytest.mark.parametrize("dim, multiple_of, multiplier, expected", [
    (32, 32, None, 96),    # int(2*128/3) = 85 -> 96
    (32, 24, 1.3, 120),    # 85 * 1.3 -> 110 -> 120
    (48, 32, None, 128),   # exactly 128: no rounding
    (4096, 256, None, 11008),
])
def test_ffn_hidden_dim_rule(dim, multiple_of, multiplier, expected):
    args = ModelArgs(dim=dim, n_heads=4, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert args.ffn_hidden_dim == expected


def test_stated_hidden_dim_wins():
    assert ModelArgs(dim=64, n_heads=8, hidden_dim=172).ffn_hidden_dim == 172


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 30, "n_heads": 4}, "not divisible by n_heads"),
    ({"dim": 12, "n_heads": 4}, "must be even"),
    ({"dim": 32, "n_heads": 4, "n_kv_heads": 3}, "not a multiple of n_kv_heads"),
    ({"dim": 0}, "dim must be a positive integer"),
    ({"n_layers": -1}, "n_layers must be a positive integer"),
    ({"n_heads": 2.0}, "n_heads must be a positive integer"),
    ({"norm_eps": 0.0}, "norm_eps must be a positive finite number"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive finite number"),
])
def test_invalid_args_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelArgs(**kwargs)
    assert isinstance(info.value, Llama2npError)


def test_unknown_params_key_is_ignored_but_bad_value_is_named():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelArgs.from_params({"dim": 64, "n_heads": 8, "n_layers": 1, "n_kv_heads": 0})
