#!/usr/bin/env python
"""Regenerate ``tests/golden/``: small random Llama 2 models and reference logits from HF transformers.

The expected logits come from an implementation independent of llama2np:
Hugging Face transformers' ``LlamaForCausalLM`` run in float64, cross-checked
against a direct float64 torch transcription of Meta's formulas (the two must
agree to ~1e-12). Nothing here imports llama2np. The float64 reference computation lives in
``golden_reference.py`` beside this script.

Fixtures written (one directory each, plus ``manifest.json`` describing them):
  * Meta-layout checkpoints (``params.json`` + ``consolidated.00.pth``) of
    random models covering multi-head, grouped-query (2 kv heads), one kv head
    (stored in bf16, rope_theta 1e6), and ffn_dim_multiplier with rounding.
  * ``layouts/``: ONE random grouped-query model saved as Meta single-file,
    Meta 2-shard (split as fairscale does), HF ``model.safetensors`` and HF
    2-file sharded safetensors, each in float32 and bfloat16.
  * ``stories260K/``: ids and reference logits for llama2.c's stories260K model (from the real-weight test data, see tests/conftest.py)
    (the model file itself is never copied into the repository).

Usage (needs the ``reference`` extra: torch, transformers):
    python scripts/golden/make_golden.py [--out tests/golden]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from golden_reference import reference_logits

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
BOS = 1


@dataclass
class Spec:
    """One random model: Meta's hyper-parameters plus how it is stored."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    multiple_of: int
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    storage: str = "float32"  # "float32" or "bfloat16"
    seed: int = 0
    n_ids: int = 32  # random ids after BOS
    max_seq_len: int = 64

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size exactly as Meta's FeedForward derives it."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


META_SPECS = [
    Spec("mha", dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, multiple_of=32, seed=1),
    Spec("gqa2", dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=96, multiple_of=32, norm_eps=1e-6,
         seed=2),
    Spec("mqa_bf16", dim=32, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=128, multiple_of=16,
         norm_eps=1e-6, rope_theta=1e6, storage="bfloat16", seed=3),
    # int(2*4*32/3) = 85; * 1.3 -> 110; rounded up to a multiple of 24 -> 120
    Spec("ffn_mult", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=24,
         ffn_dim_multiplier=1.3, seed=4),
]
LAYOUT_SPEC = Spec("layouts", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, seed=5)


# --- random HF model -----------------------------------------------------------------------


def hf_config(spec: Spec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
    )


@torch.no_grad()
def random_hf_model(spec: Spec) -> LlamaForCausalLM:
    """A LlamaForCausalLM in the storage dtype with weights scaled so logits spread out.

    HF's default init (std 0.02) gives near-constant logits that would hide
    bugs; instead embeddings are ~N(0, 1), projections ~N(0, 1/in_features)
    (unit-variance activations), the classifier a little larger, and the
    norm weights vary around 1 so a swapped or missing norm shows.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    model = LlamaForCausalLM(hf_config(spec)).float()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            scale = (2.5 if name == "lm_head.weight" else 1.0) / math.sqrt(p.shape[1])
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.to(torch.bfloat16) if spec.storage == "bfloat16" else model


# --- Meta layout ---------------------------------------------------------------------------


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's permutation of wq/wk rows (rotate-half order -> Meta's interleaved pairs).

    HF's convert script maps Meta -> HF with
    w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols);
    this is its inverse.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's own Meta -> HF permutation of wq/wk rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_freqs(spec: Spec) -> torch.Tensor:
    """The ``rope.freqs`` tensor Meta's checkpoints carry (unused by inference)."""
    return 1.0 / spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim)


#: a layer's Meta name -> HF name (wq/wk rows also reordered, ``meta_to_hf_rows``)
LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


@torch.no_grad()
def load_meta_state(model: LlamaForCausalLM, state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> None:
    """Copy a state dict in Meta's names and row order into an HF model (in the model's dtype)."""
    model.model.embed_tokens.weight.copy_(state["tok_embeddings.weight"])
    model.model.norm.weight.copy_(state["norm.weight"])
    model.lm_head.weight.copy_(state["output.weight"])
    heads = {"attention.wq": n_heads, "attention.wk": n_kv_heads}
    for i, layer in enumerate(model.model.layers):
        for meta, hf in LAYER_NAMES.items():
            w = state[f"layers.{i}.{meta}.weight"]
            layer.get_submodule(hf).weight.copy_(meta_to_hf_rows(w, heads[meta]) if meta in heads else w)


def meta_state_dict(model: LlamaForCausalLM, spec: Spec) -> dict[str, torch.Tensor]:
    """The HF model's weights under Meta's names and row order, in the storage dtype."""
    sd = model.state_dict()
    dtype = sd["lm_head.weight"].dtype
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(spec.n_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        out[meta + "attention.wq.weight"] = hf_to_meta_rows(sd[hf + "self_attn.q_proj.weight"], spec.n_heads)
        out[meta + "attention.wk.weight"] = hf_to_meta_rows(sd[hf + "self_attn.k_proj.weight"], spec.n_kv_heads)
        out[meta + "attention.wv.weight"] = sd[hf + "self_attn.v_proj.weight"]
        out[meta + "attention.wo.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[meta + "feed_forward.w1.weight"] = sd[hf + "mlp.gate_proj.weight"]
        out[meta + "feed_forward.w2.weight"] = sd[hf + "mlp.down_proj.weight"]
        out[meta + "feed_forward.w3.weight"] = sd[hf + "mlp.up_proj.weight"]
        out[meta + "attention_norm.weight"] = sd[hf + "input_layernorm.weight"]
        out[meta + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"]
    out["rope.freqs"] = rope_freqs(spec).to(dtype)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def meta_params(spec: Spec) -> dict:
    """params.json as Meta writes it (vocab_size -1; n_kv_heads etc. only when they apply)."""
    params = {"dim": spec.dim, "multiple_of": spec.multiple_of, "n_heads": spec.n_heads,
              "n_layers": spec.n_layers, "norm_eps": spec.norm_eps, "vocab_size": -1}
    if spec.n_kv_heads != spec.n_heads:
        params["n_kv_heads"] = spec.n_kv_heads
    if spec.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = spec.ffn_dim_multiplier
    if spec.rope_theta != 10000.0:
        params["rope_theta"] = spec.rope_theta
    return params


# fairscale's model parallelism: column-parallel layers split their output rows (dim 0),
# row-parallel layers and the parallel embedding split their input columns (dim 1).
_SPLIT_DIM0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_SPLIT_DIM1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")


def shard_state_dict(state: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    shards = [{} for _ in range(n_shards)]
    for name, t in state.items():
        axis = 0 if name.endswith(_SPLIT_DIM0) else 1 if name.endswith(_SPLIT_DIM1) else None
        parts = [t] * n_shards if axis is None else list(torch.chunk(t, n_shards, dim=axis))
        assert all(p.shape == parts[0].shape for p in parts), f"{name} does not split evenly"
        for shard, part in zip(shards, parts):
            shard[name] = part.clone().contiguous()
    return shards


def save_meta(model: LlamaForCausalLM, spec: Spec, directory: Path, n_shards: int = 1) -> None:
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(meta_params(spec)) + "\n")
    for i, shard in enumerate(shard_state_dict(meta_state_dict(model, spec), n_shards)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


# --- HF layout -----------------------------------------------------------------------------


def legacy_hf_config(spec: Spec, with_rope_theta: bool) -> dict:
    """config.json with the keys the meta-llama/Llama-2-*-hf repositories ship."""
    config = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": spec.dim, "initializer_range": 0.02, "intermediate_size": spec.hidden_dim,
        "max_position_embeddings": spec.max_seq_len, "model_type": "llama",
        "num_attention_heads": spec.n_heads, "num_hidden_layers": spec.n_layers,
        "num_key_value_heads": spec.n_kv_heads, "pretraining_tp": 1, "rms_norm_eps": spec.norm_eps,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": spec.storage,
        "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": spec.vocab_size,
    }
    if with_rope_theta:
        config["rope_theta"] = spec.rope_theta
    return config


def save_hf(model: LlamaForCausalLM, spec: Spec, directory: Path, n_files: int, with_rope_theta: bool) -> None:
    """HF's own save_pretrained (its q/k row order, its safetensors), Llama-2-hf style config.json."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = total if n_files == 1 else total // n_files + total // 8
    model.save_pretrained(directory, max_shard_size=max_shard)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    expected = (["model.safetensors"] if n_files == 1 else
                [f"model-{k:05d}-of-{n_files:05d}.safetensors" for k in range(1, n_files + 1)])
    assert files == expected, f"save_pretrained wrote {files}, wanted {expected}"
    (directory / "config.json").write_text(json.dumps(legacy_hf_config(spec, with_rope_theta), indent=2) + "\n")
    (directory / "generation_config.json").unlink(missing_ok=True)


def random_ids(spec: Spec) -> np.ndarray:
    rng = np.random.default_rng(1000 + spec.seed)
    return np.concatenate([[BOS], rng.integers(3, spec.vocab_size, spec.n_ids)]).astype(np.int64)


def save_reference(path: Path, ids: np.ndarray, logits: np.ndarray, **meta) -> None:
    np.savez_compressed(path, ids=ids, logits=logits, meta=json.dumps(meta))


# --- stories260K (llama2.c) ---------------------------------------------------------------


def read_llama2c(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The llama2.c checkpoint format, read directly with NumPy (independent of llama2np)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = np.frombuffer(raw, "<i4", 7).tolist()
    kv_dim, head = dim * n_kv_heads // n_heads, dim // n_heads
    data = np.frombuffer(raw, "<f4", offset=28)
    shapes = [("tok", (abs(vocab), dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("freq_re", (seq_len, head // 2)),
              ("freq_im", (seq_len, head // 2))]
    if vocab < 0:
        shapes.append(("wcls", (-vocab, dim)))
    arrays, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = data[pos:pos + n].reshape(shape)
        pos += n
    assert pos == data.size, f"{path}: {data.size - pos} floats left over"
    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab, seq_len=seq_len)
    return header, arrays


@torch.no_grad()
def stories260k_model() -> tuple[LlamaForCausalLM, Spec, dict]:
    """(HF model, spec, llama2.c header) of ../shared's stories260K, read directly from its .bin."""
    path = SHARED / "stories260K" / "stories260K.bin"
    header, a = read_llama2c(path)
    vocab = abs(header["vocab_size"])
    spec = Spec("stories260K", dim=header["dim"], n_layers=header["n_layers"], n_heads=header["n_heads"],
                n_kv_heads=header["n_kv_heads"], vocab_size=vocab, multiple_of=1,
                max_seq_len=header["seq_len"])
    config = hf_config(spec)
    config.intermediate_size = header["hidden_dim"]
    model = LlamaForCausalLM(config).float()
    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    m = model.model
    m.embed_tokens.weight.copy_(t(a["tok"]))
    model.lm_head.weight.copy_(t(a["wcls"] if "wcls" in a else a["tok"]))  # positive vocab: tied
    m.norm.weight.copy_(t(a["rms_final"]))
    for i, layer in enumerate(m.layers):
        layer.self_attn.q_proj.weight.copy_(meta_to_hf_rows(t(a["wq"][i]), spec.n_heads))
        layer.self_attn.k_proj.weight.copy_(meta_to_hf_rows(t(a["wk"][i]), spec.n_kv_heads))
        layer.self_attn.v_proj.weight.copy_(t(a["wv"][i]))
        layer.self_attn.o_proj.weight.copy_(t(a["wo"][i]))
        layer.mlp.gate_proj.weight.copy_(t(a["w1"][i]))
        layer.mlp.down_proj.weight.copy_(t(a["w2"][i]))
        layer.mlp.up_proj.weight.copy_(t(a["w3"][i]))
        layer.input_layernorm.weight.copy_(t(a["rms_att"][i]))
        layer.post_attention_layernorm.weight.copy_(t(a["rms_ffn"][i]))
    return model, spec, header


@torch.no_grad()
def make_stories260k(out: Path, n_prompt: int = 48) -> dict:
    path = SHARED / "stories260K" / "stories260K.bin"
    model, spec, header = stories260k_model()
    greedy = [int(x) for x in (SHARED / "reference" / "stories260K_greedy_200_ids.txt").read_text().split()]
    ids = np.array(greedy[: n_prompt + 1], dtype=np.int64)
    logits = reference_logits(model, meta_state_dict(model, spec), spec, ids)
    # llama2.c's greedy run is the truth for the model's argmax: HF must reproduce it.
    agree = np.argmax(logits[:-1], axis=-1) == ids[1:]
    assert agree.all(), f"stories260K: HF argmax departs from llama2.c's greedy ids at {np.flatnonzero(~agree)}"
    (out / "stories260K").mkdir(parents=True)
    save_reference(out / "stories260K" / "reference.npz", ids, logits,
                   source="stories260K/stories260K.bin (llama2.c)",
                   sha256=hashlib.sha256(path.read_bytes()).hexdigest(), header=header)
    return {"kind": "llama2c", "shared": ["stories260K", "stories260K.bin"],
            "tokenizer": ["stories260K", "tok512.model"], "reference": "stories260K/reference.npz"}


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden")
    out = parser.parse_args().out
    torch.manual_seed(0)
    for child in out.glob("*"):  # regenerate from scratch, but keep the README
        if child.is_dir():
            shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}

    print("Meta-layout models:")
    for spec in META_SPECS:
        model = random_hf_model(spec)
        ids = random_ids(spec)
        save_meta(model, spec, out / spec.name)
        logits = reference_logits(model, meta_state_dict(model, spec), spec, ids)
        save_reference(out / spec.name / "reference.npz", ids, logits, **asdict(spec), hidden_dim=spec.hidden_dim)
        manifest[spec.name] = {"kind": "meta", "dir": spec.name, "reference": f"{spec.name}/reference.npz",
                               "storage": spec.storage}

    print("One model in every layout:")
    base = random_hf_model(LAYOUT_SPEC)
    ids = random_ids(LAYOUT_SPEC)
    for storage in ("float32", "bfloat16"):
        spec = Spec(**{**asdict(LAYOUT_SPEC), "storage": storage})
        model = base.to(torch.bfloat16) if storage == "bfloat16" else base
        ref = f"layouts/reference_{storage}.npz"
        (out / "layouts").mkdir(exist_ok=True)
        logits = reference_logits(model, meta_state_dict(model, spec), spec, ids)
        save_reference(out / ref, ids, logits, **asdict(spec), hidden_dim=spec.hidden_dim)
        tag = "fp32" if storage == "float32" else "bf16"
        writers = {
            f"meta_{tag}": lambda d: save_meta(model, spec, d, n_shards=1),
            f"meta_2shard_{tag}": lambda d: save_meta(model, spec, d, n_shards=2),
            f"hf_{tag}": lambda d: save_hf(model, spec, d, n_files=1, with_rope_theta=False),
            f"hf_sharded_{tag}": lambda d: save_hf(model, spec, d, n_files=2, with_rope_theta=True),
        }
        for name, write in writers.items():
            write(out / "layouts" / name)
            manifest[f"layouts/{name}"] = {"kind": name.split("_")[0], "dir": f"layouts/{name}",
                                           "reference": ref, "storage": storage}

    print("stories260K (llama2.c, from the real-weight test data):")
    manifest["stories260K"] = make_stories260k(out)

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    print("GGUF files (llama.cpp's format) of the layouts model:")
    from make_gguf_golden import write_all  # needs the gguf extra too

    write_all(out)
    print("RoPE scaling and CodeLlama-shaped references:")
    from make_rope_golden import write_all as write_rope

    write_rope(out / "rope")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(manifest)} fixtures to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
