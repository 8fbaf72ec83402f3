#!/usr/bin/env python
"""Write a random-weight Llama 2 checkpoint at real shapes, without torch, to measure load time and memory.

    python scripts/checkpoints/make_synthetic_checkpoint.py --shape 7b --layout hf --dtype bf16 --out /tmp/synth-7b-hf
    python scripts/checkpoints/make_synthetic_checkpoint.py --shape 13b --layout meta --out /tmp/synth-13b-meta  # 2 shards
    python scripts/checkpoints/make_synthetic_checkpoint.py --shape 70b --layers 2 --layout meta --shards 8 \
        --out /tmp/synth-70b-2layer-meta  # 70B's layer shapes, 2 of its 80 layers (tensor-parallel benchmark)

Layouts: ``meta`` (params.json + consolidated.NN.pth, split across model-parallel
shards as fairscale does; default shard count as Meta ships: 7b 1, 13b 2, 70b 8),
``hf`` (config.json + model-0000K-of-0000N.safetensors + index, HF's q/k row order)
and ``llama2c`` (fp32 .bin). Tensors are written one at a time, so memory stays
near the largest tensor. Values are a random block tiled over each tensor, scaled
by 1/sqrt(fan_in), so the model's activations stay in a sane range.

The writer functions take any ``source(meta_name, shape) -> array`` (Meta layout),
so tests reuse them to write a given state dict in every layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..loaders.common import expected_shapes
from ..loaders.hf import meta_name
from ..loaders.llama2c import HEADER
from ..loaders.meta import split_axis
from ..model.args import PRESETS, ModelArgs
from ..model.storage import float32_to_bf16
from .writers import TensorSpec, write_pth, write_safetensors

#: source(meta_name, shape) -> the full tensor in Meta layout, in the dtype to store
Source = Callable[[str, tuple], np.ndarray]

SHAPES = {
    "7b": PRESETS["7B"], "13b": PRESETS["13B"], "70b": PRESETS["70B"],
    # smaller Llama-2-architecture shapes for quick benchmarks (llama2.c's stories15M and stories110M;
    # a TinyLlama-sized 1B)
    "15m": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256, hidden_dim=768),
    "110m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024, hidden_dim=2048),
    "1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048,
                    hidden_dim=5632),
}
META_SHARDS = {"7b": 1, "13b": 2, "70b": 8}

def write_meta(out: Path, args: ModelArgs, source: Source, dtype: str, n_shards: int = 1) -> None:
    """params.json + consolidated.00.pth ... split the way Meta's release is."""
    derived = ModelArgs(**dict(args.to_params(), hidden_dim=None)).ffn_hidden_dim
    if args.ffn_hidden_dim != derived:
        raise ValueError(f"hidden_dim={args.hidden_dim} cannot be expressed in a Meta params.json "
                         f"(dim, multiple_of, ffn_dim_multiplier give {derived})")
    out.mkdir(parents=True, exist_ok=True)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "multiple_of": args.multiple_of,
              "norm_eps": args.norm_eps, "vocab_size": -1}
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    (out / "params.json").write_text(json.dumps(params))
    shapes = dict(expected_shapes(args), **{"rope.freqs": (args.head_dim // 2,)})
    for k in range(n_shards):
        specs = []
        for name, shape in shapes.items():
            axis = split_axis(name)
            if axis is not None:
                shape = tuple(n // n_shards if a == axis else n for a, n in enumerate(shape))
            specs.append(TensorSpec(name, shape, dtype))

        def produce(spec: TensorSpec, k=k) -> list[np.ndarray]:
            full = source(spec.name, shapes[spec.name])
            axis = split_axis(spec.name)
            if axis is None or n_shards == 1:
                return [full]
            size = spec.shape[axis]
            return [full[k * size:(k + 1) * size] if axis == 0 else full[:, k * size:(k + 1) * size]]

        write_pth(out / f"consolidated.{k:02d}.pth", specs, produce)
        print(f"  wrote {out / f'consolidated.{k:02d}.pth'}", file=sys.stderr)


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> HF's rotate-half order (what HF's conversion script does)."""
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, in_features).transpose(0, 2, 1, 3)).reshape(
        out_features, in_features)


def hf_names(args: ModelArgs) -> dict[str, str]:
    """HF name -> Meta name for every tensor of the model."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{w}_proj.weight" for w in "qkvo"]
        names += [p + f"mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return {n: meta_name(n) for n in names}


def hf_config(args: ModelArgs, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "max_position_embeddings": args.max_seq_len,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": None,
            "vocab_size": args.vocab_size, "tie_word_embeddings": False, "torch_dtype": dtype,
            "bos_token_id": 1, "eos_token_id": 2}


def write_hf(out: Path, args: ModelArgs, source: Source, dtype: str, shard_bytes: int = 5 << 30,
             fmt: str = "safetensors") -> None:
    """config.json + model.safetensors, or model-0000K-of-0000N.safetensors + index when over shard_bytes.

    ``fmt="pytorch"`` writes pytorch_model*.bin (torch zip) instead.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
    shapes = expected_shapes(args)
    groups, size = [[]], 0
    for hf, meta in hf_names(args).items():
        spec = TensorSpec(hf, shapes[meta], dtype)
        if groups[-1] and size + spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    names = hf_names(args)

    def produce(spec: TensorSpec) -> list[np.ndarray]:
        w = source(names[spec.name], spec.shape)
        if spec.name.endswith(("q_proj.weight", "k_proj.weight")):
            w = hf_permute(w, args.n_heads if spec.name.endswith("q_proj.weight") else args.n_kv_heads)
        return [w]

    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map, n = {}, len(groups)
    for k, specs in enumerate(groups):
        file = f"{stem}.{ext}" if n == 1 else f"{stem}-{k + 1:05d}-of-{n:05d}.{ext}"
        if fmt == "safetensors":
            write_safetensors(out / file, specs, produce, metadata={"format": "pt"})
        else:
            write_pth(out / file, specs, produce)
        weight_map.update({s.name: file for s in specs})
        print(f"  wrote {out / file}", file=sys.stderr)
    if n > 1:
        total = sum(s.nbytes for g in groups for s in g)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def write_llama2c(path: Path, args: ModelArgs, source: Source, tied: bool = False) -> None:
    """llama2.c's legacy fp32 .bin (header, stacked per-kind arrays, freq_cis tables, wcls when untied)."""
    shapes = expected_shapes(args)
    header = np.array([(args.dim, args.ffn_hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                        args.vocab_size if tied else -args.vocab_size, args.max_seq_len)], dtype=HEADER)
    layer = [("attention_norm", None), ("attention", "wq"), ("attention", "wk"), ("attention", "wv"),
             ("attention", "wo"), ("ffn_norm", None), ("feed_forward", "w1"), ("feed_forward", "w2"),
             ("feed_forward", "w3")]

    def get(name):
        return np.asarray(source(name, shapes[name]), dtype="<f4")

    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(get("tok_embeddings.weight").tobytes())
        for module, w in layer:
            for i in range(args.n_layers):
                name = f"layers.{i}.{module}.{w}.weight" if w else f"layers.{i}.{module}.weight"
                f.write(get(name).tobytes())
        f.write(get("norm.weight").tobytes())
        f.write(np.zeros(2 * args.max_seq_len * (args.head_dim // 2), dtype="<f4").tobytes())  # freq_cis
        if not tied:
            f.write(get("output.weight").tobytes())


def seeded_source(seed: int = 0, output_scale: float = 2.5) -> Source:
    """Normal random weights, each tensor from its own generator (seed, crc32 of its name): the same
    values whatever order tensors are asked in, so a reference script and a test can share a model
    without a file. Embeddings ~N(0, 1), matrices ~N(0, 1/in_features) (the classifier
    ``output_scale`` times that, so logits spread), norm weights uniform in [0.5, 1.5); float32."""
    def source(name: str, shape: tuple) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name.endswith("norm.weight") or name == "rope.freqs":
            return (0.5 + rng.random(shape)).astype(np.float32)
        w = rng.standard_normal(shape)
        if name != "tok_embeddings.weight":
            w *= (output_scale if name == "output.weight" else 1.0) / np.sqrt(shape[-1])
        return w.astype(np.float32)

    return source


def random_source(args: ModelArgs, dtype: str, seed: int = 0) -> Source:
    """Cheap random weights: one normal block per scale, tiled (with a per-tensor shift) over each tensor."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1 << 20) + 7).astype(np.float32)  # prime-ish length: rows do not repeat
    blocks: dict[float, np.ndarray] = {}
    counter = iter(range(1 << 30))

    def block(scale: float, shift: float = 0.0) -> np.ndarray:
        key = (scale, shift)
        if key not in blocks:
            values = base * np.float32(scale) + np.float32(shift)
            blocks[key] = float32_to_bf16(values) if dtype == "bfloat16" else values.astype(dtype)
        return blocks[key]

    def source(name: str, shape: tuple) -> np.ndarray:
        if name.endswith("norm.weight"):
            b = block(0.05, 1.0)  # norms near 1
        elif name == "rope.freqs":
            b = block(0.0, 1.0)
        elif name == "tok_embeddings.weight":
            b = block(1.0)
        else:
            b = block(1.0 / np.sqrt(shape[-1]))
        shift = next(counter) * 7919 % b.size
        return np.resize(np.roll(b, shift), shape)

    return source


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layout", choices=["meta", "hf", "hf-pytorch", "llama2c"], default="hf")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--layers", type=int, help="keep only this many layers of the shape (default: all)")
    ap.add_argument("--shards", type=int, help="Meta: model-parallel shards (default as Meta ships)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="HF: max size of one weight file (GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    args = SHAPES[a.shape]
    if a.layers is not None:
        args = dataclasses.replace(args, n_layers=a.layers)
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[a.dtype]
    if a.layout == "llama2c":
        dtype = "float32"  # the legacy llama2.c format is fp32 only
    source = random_source(args, dtype, a.seed)
    t0 = time.perf_counter()
    if a.layout == "meta":
        write_meta(a.out, args, source, dtype, a.shards or META_SHARDS.get(a.shape, 1))
    elif a.layout == "llama2c":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_llama2c(a.out, args, source)
    else:
        write_hf(a.out, args, source, dtype, int(a.shard_gb * 1e9), "safetensors" if a.layout == "hf" else "pytorch")
    print(f"{a.shape} {a.layout} {dtype}: {args.num_parameters() / 1e9:.2f} B parameters written to {a.out} "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
