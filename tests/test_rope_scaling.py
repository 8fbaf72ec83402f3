"""RoPE scaling (linear, dynamic NTK) and CodeLlama's RoPE base against Hugging Face, in every layout.

The references (``tests/golden/rope``, ``scripts/golden/make_rope_golden.py``) are HF
transformers' float64 logits with its own RoPE code, and an independent float64
transcription of the formulas. The weights are rebuilt here from the fixture's seed
and written as an HF directory, a Meta directory and a GGUF file, each stating the
scaling its own way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from llama2np import ContextLengthWarning, Llama2, ModelArgs
from llama2np.errors import ConfigError
from llama2np.loaders.common import expected_shapes
from llama2np.model.rope import rope_frequencies
from llama2np.testing.synthetic import seeded_source, write_hf, write_meta

GOLDEN = Path(__file__).parent / "golden" / "rope"


def fixture(name: str) -> tuple[dict, dict]:
    data = np.load(GOLDEN / f"{name}.npz")
    return json.loads(str(data["meta"])), {k: data[k] for k in data.files if k != "meta"}


def write_layout(layout: str, name: str, out: Path, tokenizer_model: Path | None = None) -> Path:
    """The fixture's model in ``layout``, its RoPE settings spelled as that format spells them
    (a GGUF embeds ``tokenizer_model``'s vocabulary when given)."""
    meta, _ = fixture(name)
    args, config = ModelArgs(**meta["args"]), meta["config_json"]
    source = seeded_source(meta["seed"])
    scaling = config.get("rope_scaling")
    if layout == "hf":
        write_hf(out, args, source, "float32")
        (out / "config.json").write_text(json.dumps(config))
        return out
    if layout == "meta":
        write_meta(out, args, source, "float32")
        params = json.loads((out / "params.json").read_text())
        params.update(max_seq_len=config["max_position_embeddings"], rope_theta=config["rope_theta"])
        if scaling:
            params["rope_scaling"] = scaling
        (out / "params.json").write_text(json.dumps(params))
        return out
    ge = pytest.importorskip("llama2np.testing.gguf_export")
    h = ge.HParams(args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.vocab_size,
                   args.norm_eps, args.rope_theta, config["max_position_embeddings"])
    shapes = expected_shapes(args)
    keys = {}
    if scaling:
        keys = {"llama.rope.scaling.type": scaling["type"], "llama.rope.scaling.factor": float(scaling["factor"])}
    types = {n: pytest.importorskip("gguf").GGMLQuantizationType.F32 for n in ge.meta_shapes(h)}
    out.mkdir(parents=True, exist_ok=True)
    return ge.write_gguf(out / "model.gguf", h, types, lambda n: source(n, shapes[n]), extra_keys=keys,
                         tokenizer_model=tokenizer_model)


def case_logits(model: Llama2, ids: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Logits of every position, computed in the forward calls ``ends`` describes (one call, or a
    prefill then one token per call through the KV cache)."""
    t = model.model
    if (ends == len(ids)).all():
        return t.forward(ids[None])[0]
    prefill = int(ends[0])
    cache = t.new_cache(1, len(ids))
    out = [t.forward(ids[None, :prefill], 0, cache)[0]]
    out += [t.forward(ids[None, p:p + 1], p, cache)[0] for p in range(prefill, len(ids))]
    return np.concatenate(out)


CASES = [("linear", "full"), ("linear", "cached"), ("dynamic", "within"), ("dynamic", "beyond"),
         ("dynamic", "cached"), ("codellama", "full")]
LAYOUTS = {"linear": ["hf", "meta", "gguf"], "dynamic": ["hf", "meta"], "codellama": ["hf", "meta", "gguf"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(name, layout) -> path, written once."""
    root = tmp_path_factory.mktemp("rope")
    return {(name, layout): write_layout(layout, name, root / f"{name}-{layout}")
            for name, layouts in LAYOUTS.items() for layout in layouts}


@pytest.mark.parametrize("name,case", CASES)
@pytest.mark.parametrize("layout", ["hf", "meta", "gguf"])
def test_logits_match_hf_and_the_formulas(checkpoints, name, case, layout):
    if layout not in LAYOUTS[name]:
        pytest.skip(f"{name} scaling has no GGUF spelling (refused: see test_gguf_dynamic_is_refused)")
    _, ref = fixture(name)
    n, cols = len(ref[f"{case}_ends"]), ref["columns"]
    ids = ref["ids"][:n]
    f64 = case_logits(Llama2.from_pretrained(checkpoints[name, layout], dtype="float64"), ids, ref[f"{case}_ends"])
    assert np.abs(f64[:, cols] - ref[f"{case}_formula"]).max() < 1e-12
    assert np.abs(f64[:, cols] - ref[f"{case}_hf"]).max() < 1e-6
    f32 = case_logits(Llama2.from_pretrained(checkpoints[name, layout]), ids, ref[f"{case}_ends"])
    assert np.abs(f32[:, cols] - ref[f"{case}_hf"]).max() < 1e-4


def test_the_scaling_is_what_makes_them_match(checkpoints, tmp_path):
    """Plain RoPE misses the references by far; dynamic's cached run differs from its one-call run
    (each decoding step has its own base), and within the original context dynamic is plain RoPE."""
    for name, case in [("linear", "full"), ("dynamic", "beyond"), ("dynamic", "cached")]:
        plain = _hf_with(checkpoints[name, "hf"], tmp_path / f"{name}-{case}", rope_scaling=None,
                         max_position_embeddings=64)
        _, ref = fixture(name)
        n = len(ref[f"{case}_ends"])
        got = case_logits(Llama2.from_pretrained(plain, dtype="float64"), ref["ids"][:n], ref[f"{case}_ends"])
        assert np.abs(got - ref[f"{case}_hf"]).max() > 0.05, (name, case)
    _, ref = fixture("dynamic")
    assert np.abs(ref["cached_hf"][-20:] - ref["beyond_hf"][-20:]).max() > 1e-3
    within = case_logits(Llama2.from_pretrained(plain, dtype="float64"), ref["ids"][:24], ref["within_ends"])
    assert np.abs(within - ref["within_formula"]).max() < 1e-12


def test_float64_frequencies_are_the_formulas():
    """rope_frequencies against the formulas written out (HF's, in float64)."""
    d, theta = 8, 10000.0
    plain = theta ** -(np.arange(0, d, 2) / d)
    lin = ModelArgs(dim=32, n_heads=4, rope_scaling="linear", rope_scaling_factor=4.0)
    np.testing.assert_allclose(rope_frequencies(lin), plain / 4, rtol=1e-15)
    dyn = ModelArgs(dim=32, n_heads=4, rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_seq_len=32,
                    max_seq_len=64)
    np.testing.assert_allclose(rope_frequencies(dyn, seq_len=32), plain, rtol=1e-15)
    base = theta * (2.0 * 50 / 32 - 1.0) ** (d / (d - 2))
    np.testing.assert_allclose(rope_frequencies(dyn, seq_len=50), base ** -(np.arange(0, d, 2) / d), rtol=1e-14)


def test_scaled_context_length(checkpoints):
    """The context is the stretched one: dynamic factor 2 over 32 positions is 64; linear keeps the stated 128;
    CodeLlama's config loads with its 32016 tokens, base 1e6 and 16384 positions."""
    for layout in ("hf", "meta"):
        args = Llama2.from_pretrained(checkpoints["dynamic", layout]).args
        assert (args.max_seq_len, args.rope_original_max_seq_len, args.rope_scaling) == (64, 32, "dynamic")
    for layout in ("hf", "meta", "gguf"):
        args = Llama2.from_pretrained(checkpoints["linear", layout]).args
        assert (args.max_seq_len, args.rope_scaling, args.rope_scaling_factor) == (128, "linear", 4.0)
        code = Llama2.from_pretrained(checkpoints["codellama", layout]).args
        assert (code.vocab_size, code.rope_theta, code.max_seq_len, code.rope_scaling) == (32016, 1e6, 16384, None)
    path = checkpoints["dynamic", "hf"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama2.from_pretrained(path, max_seq_len=64)
    with pytest.warns(ContextLengthWarning, match="past the 64 positions"):
        Llama2.from_pretrained(path, max_seq_len=65)
    model = Llama2.from_pretrained(path)
    with pytest.warns(ContextLengthWarning, match="context length 64"):
        out = model.generate([1, 5, 9], max_new_tokens=100, temperature=0, logprobs=True)
    assert len(out.ids) == 61 and out.finish_reason == "context"


def test_plan_uses_the_scaled_context(checkpoints, capsys):
    from llama2np.cli import main
    from llama2np.distributed.memory_plan import read_model_config

    for layout in ("hf", "meta"):
        assert read_model_config(checkpoints["dynamic", layout])[0].max_seq_len == 64
    assert main(["plan", "--model", str(checkpoints["dynamic", "hf"])]) == 0
    assert "context 64" in capsys.readouterr().out


def test_kv_reuse_stays_exact_with_dynamic_scaling(checkpoints):
    """A new sequence reuses no keys rotated with another call's base: logits() after a shorter
    sequence past the original context equals the one-call reference; generation is greedy-exact."""
    _, ref = fixture("dynamic")
    model = Llama2.from_pretrained(checkpoints["dynamic", "hf"], dtype="float64")
    ids = ref["ids"]
    model.logits(ids[:40])  # positions 0..39 cached with the base of a 40-long call
    assert np.abs(model.logits(ids[:56]) - ref["beyond_formula"]).max() < 1e-12
    model.logits(ids[:10])
    assert np.abs(model.logits(ids[:24]) - ref["within_formula"]).max() < 1e-12
    fresh = Llama2.from_pretrained(checkpoints["dynamic", "hf"], dtype="float64")
    first = model.generate(ids[:30].tolist(), max_new_tokens=20, temperature=0)
    assert model.generate(ids[:30].tolist(), max_new_tokens=20, temperature=0) == first
    assert fresh.generate(ids[:30].tolist(), max_new_tokens=20, temperature=0, reuse_cache=False) == first
    model.generate(ids[:36].tolist(), max_new_tokens=2, temperature=0)  # keys of 0..35 with a 36-long base
    again = model.generate(ids[:45].tolist(), max_new_tokens=8, temperature=0, logprobs=True)
    alone = fresh.generate(ids[:45].tolist(), max_new_tokens=8, temperature=0, logprobs=True, reuse_cache=False)
    assert again.ids == alone.ids and np.abs(np.subtract(again.logprobs, alone.logprobs)).max() < 1e-12


def test_batch_rows_are_as_alone_with_dynamic_scaling(checkpoints):
    """Rows of a batch decode each at its own position; with dynamic scaling each row is rotated with its
    own pass's base (HF's batch would give every row the longest row's), so each row is as alone."""
    _, ref = fixture("dynamic")
    model = Llama2.from_pretrained(checkpoints["dynamic", "hf"], dtype="float64")
    prompts = [ref["ids"][:36].tolist(), ref["ids"][:45].tolist()]
    batch = model.generate(prompts, max_new_tokens=6, temperature=0, logprobs=True, reuse_cache=False)
    for p, row in zip(prompts, batch):
        alone = model.generate(p, max_new_tokens=6, temperature=0, logprobs=True, reuse_cache=False)
        assert row.ids == alone.ids and np.abs(np.subtract(row.logprobs, alone.logprobs)).max() < 1e-12


def _hf_with(path: Path, out: Path, **keys) -> Path:
    """The HF checkpoint at ``path`` (weights linked) with config.json keys replaced (None: removed)."""
    out.mkdir(parents=True)
    for f in path.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in keys}
    (out / "config.json").write_text(json.dumps(dict(config, **{k: v for k, v in keys.items() if v is not None})))
    return out


@pytest.mark.parametrize("keys,match", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "rope_type 'llama3'"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "rope_type 'longrope'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "su", "factor": 2.0}}, "rope_type 'su'"),
    ({"rope_scaling": {"type": "linear"}}, "needs a factor"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor must be >= 1"),
    ({"rope_scaling": {"type": "linear", "factor": "4"}}, "factor must be a positive finite number"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0, "attention_factor": 1.2}}, "attention_factor"),
    ({"rope_scaling": {"type": "linear", "rope_type": "dynamic", "factor": 4.0}}, "disagree"),
    ({"rope_scaling": {"factor": 4.0}}, "without a scaling type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}},
     "original_max_position_embeddings=16 differs"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0, "rope_theta": 5e5}}, "rope_theta=10000.0 but"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a JSON object"),
])
def test_config_json_scalings_refused(checkpoints, tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match):
        Llama2.from_pretrained(_hf_with(checkpoints["linear", "hf"], tmp_path / "m", **keys))


def test_config_json_spellings(checkpoints, tmp_path):
    """transformers >= 5's rope_parameters and the rope_type spelling load as the old {"type": ...} does."""
    _, ref = fixture("linear")
    spelled = [{"rope_scaling": None, "rope_theta": None,
                "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
               {"rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 4}}]
    for k, keys in enumerate(spelled):
        model = Llama2.from_pretrained(_hf_with(checkpoints["linear", "hf"], tmp_path / str(k), **keys),
                                       dtype="float64")
        assert np.abs(model.logits(ref["ids"][:48], reuse_cache=False) - ref["full_formula"]).max() < 1e-12


def _gguf_with(checkpoints, tmp_path, keys: dict) -> Path:
    """The linear model's tensors under other rope metadata (via the GGUF writer, F32)."""
    ge = pytest.importorskip("llama2np.testing.gguf_export")
    meta, _ = fixture("linear")
    args = ModelArgs(**meta["args"])
    source, shapes = seeded_source(meta["seed"]), expected_shapes(args)
    h = ge.HParams(args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.vocab_size,
                   args.norm_eps, args.rope_theta, 128)
    types = {n: pytest.importorskip("gguf").GGMLQuantizationType.F32 for n in ge.meta_shapes(h)}
    return ge.write_gguf(tmp_path / "m.gguf", h, types, lambda n: source(n, shapes[n]), extra_keys=keys)


def test_gguf_older_scale_linear_key(checkpoints, tmp_path):
    """llama.rope.scale_linear (older files, no type: llama.cpp takes it as linear) is honoured."""
    _, ref = fixture("linear")
    model = Llama2.from_pretrained(_gguf_with(checkpoints, tmp_path, {"llama.rope.scale_linear": 4.0}),
                                   dtype="float64")
    assert np.abs(model.logits(ref["ids"][:48]) - ref["full_formula"]).max() < 1e-12


@pytest.mark.parametrize("keys,match", [
    ({"llama.rope.scaling.type": "dynamic", "llama.rope.scaling.factor": 2.0}, "'dynamic'.*no dynamic NTK"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 32}, "'yarn' is not supported"),
    ({"llama.rope.scaling.type": "longrope"}, "'longrope' is not supported"),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, "'none' with a scaling factor of 4"),
    ({"llama.rope.scaling.factor": 4.0, "llama.rope.scale_linear": 2.0}, "disagree"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.attn_factor": 1.5}, "llama.rope.scaling.attn_factor is not supported"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.5}, "must be >= 1"),
])
def test_gguf_scalings_refused(checkpoints, tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match):
        Llama2.from_pretrained(_gguf_with(checkpoints, tmp_path, keys))


def test_gguf_dynamic_is_refused(checkpoints, tmp_path):
    path = write_layout("gguf", "dynamic", tmp_path / "d")
    with pytest.raises(ConfigError, match="llama.rope.scaling.type 'dynamic'"):
        Llama2.from_pretrained(path)


def test_params_json_scalings_refused(checkpoints, tmp_path):
    path = checkpoints["linear", "meta"]
    out = tmp_path / "m"
    out.mkdir()
    for f in path.iterdir():
        (out / f.name).symlink_to(f)
    params = json.loads((path / "params.json").read_text())
    for scaling, match in [({"type": "yarn", "factor": 2.0}, "rope_type 'yarn'"),
                           ("ntk", "rope_scaling 'ntk' is not supported")]:
        (out / "params.json").unlink(missing_ok=True)
        (out / "params.json").write_text(json.dumps(dict(params, rope_scaling=scaling)))
        with pytest.raises(ConfigError, match=match):
            Llama2.from_pretrained(out)
    (out / "params.json").unlink()
    (out / "params.json").write_text(json.dumps(dict(params, rope_scaling=None, rope_scaling_factor=4.0)))
    with pytest.raises(ConfigError, match="rope_scaling_factor=4.0 needs a rope_scaling type"):
        Llama2.from_pretrained(out)
