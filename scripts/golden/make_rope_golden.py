#!/usr/bin/env python
"""Write ``tests/golden/rope/``: reference logits of models with RoPE scaling and a CodeLlama-shaped model.

Three small random models (weights from ``llama2np.testing.synthetic.seeded_source``, so
no weight file is committed: a test rebuilds the same weights from the seed and writes
them in the HF, Meta and GGUF layouts itself):

* ``linear``: ``rope_scaling {"type": "linear", "factor": 4.0}``, max_position_embeddings 128.
* ``dynamic``: ``rope_scaling {"type": "dynamic", "factor": 2.0}``, max_position_embeddings 32
  (HF's dynamic NTK rescales the base past it), run three ways: a whole sequence within
  the original context, a whole sequence beyond it, and a prompt prefilled within it then
  decoded one token at a time through HF's KV cache past it (every step a new base).
* ``codellama``: CodeLlama's config keys (rope_theta 1e6, vocab_size 32016,
  max_position_embeddings 16384), a narrow model; only 256 logit columns are stored.

Each case holds two float64 references:

* ``hf``: Hugging Face ``LlamaForCausalLM`` in float64 with its own RoPE code untouched
  (``modeling_rope_utils``: inverse frequencies in float32, the dynamic base recomputed
  in its forward), RMSNorm and attention in float64 (see ``golden_reference.py``).
* ``formula``: an independent float64 transcription of Meta's forward pass with the
  scaling formulas written out in float64, each position rotated with the base of the
  forward call that computed it (``ends``: where that call's positions end).

The two must agree to ~1e-6 (HF's float32 frequencies); they are checked here.

Usage (needs the ``reference`` extra): python scripts/golden/make_rope_golden.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from golden_reference import float64_hf_keep_rope, meta_reference_logits
from llama2np.loaders.common import expected_shapes
from llama2np.model.args import ModelArgs
from llama2np.testing.synthetic import seeded_source
from make_golden import load_meta_state

REPO = Path(__file__).resolve().parents[2]
BOS = 1

#: name -> (ModelArgs of the tensors, HF config.json extras, weight seed, cases: name -> (n ids, prefill or None))
CASES = {
    "linear": (ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
                         max_seq_len=128),
               {"rope_scaling": {"type": "linear", "factor": 4.0}}, 11,
               {"full": (48, None), "cached": (48, 20)}),
    "dynamic": (ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
                          max_seq_len=32),
                {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 12,
                {"within": (24, None), "beyond": (56, None), "cached": (56, 20)}),
    "codellama": (ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32016, multiple_of=16, rope_theta=1e6,
                            max_seq_len=16384),
                  {}, 13, {"full": (33, None)}),
}
LOGIT_COLUMNS = 256  # stored per position for a 32016-token vocabulary (each column is one output row)


def hf_config_json(args: ModelArgs, extra: dict) -> dict:
    """config.json as the Llama-2-*-hf repositories write it, plus the case's own keys."""
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
              "max_position_embeddings": args.max_seq_len, "model_type": "llama",
              "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
              "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps, "rope_scaling": None,
              "rope_theta": args.rope_theta, "tie_word_embeddings": False, "torch_dtype": "float32",
              "vocab_size": args.vocab_size}
    return {**config, **extra}


def meta_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    source = seeded_source(seed)
    return {name: torch.from_numpy(source(name, shape)) for name, shape in expected_shapes(args).items()}


@torch.no_grad()
def hf_model(args: ModelArgs, config_json: dict, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    keys = {k: v for k, v in config_json.items() if k not in ("architectures", "torch_dtype", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**keys)).float()
    load_meta_state(model, state, args.n_heads, args.n_kv_heads)
    return model


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, ids: np.ndarray, prefill: int | None) -> np.ndarray:
    """HF float64 logits of every position: one forward (prefill None), or a prefill then one token per call
    through HF's DynamicCache, as ``generate`` runs. A fresh copy each time: HF's dynamic RoPE keeps state."""
    ref = float64_hf_keep_rope(model)
    x = torch.from_numpy(ids)[None]
    if prefill is None:
        return ref(x, use_cache=False).logits[0].numpy()
    out = ref(x[:, :prefill], use_cache=True)
    logits, past = [out.logits[0]], out.past_key_values
    for t in range(prefill, len(ids)):
        out = ref(x[:, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits[0])
        past = out.past_key_values
    return torch.cat(logits).numpy()


def call_ends(n: int, prefill: int | None) -> np.ndarray:
    """For each position, where the positions of the forward call that computed it end."""
    if prefill is None:
        return np.full(n, n)
    return np.concatenate([np.full(prefill, prefill), np.arange(prefill + 1, n + 1)])


def formula_frequencies(args: ModelArgs, scaling: dict | None, original: int, end: int) -> torch.Tensor:
    """The scaled inverse frequencies (float64) of a call whose positions end at ``end``.

    linear: theta^(-2i/d) / factor. dynamic: for end > original, theta is replaced by
    theta * (factor * end / original - (factor - 1)) ** (d / (d - 2)) (the NTK-aware base).
    """
    d, theta = args.head_dim, args.rope_theta
    kind = (scaling or {}).get("type")
    if kind == "dynamic" and end > original:
        f = scaling["factor"]
        theta = theta * ((f * end / original) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return inv / scaling["factor"] if kind == "linear" else inv


def formula_logits(args: ModelArgs, scaling: dict | None, state: dict[str, torch.Tensor], ids: np.ndarray,
                   ends: np.ndarray) -> np.ndarray:
    """Meta's forward pass in float64, position p rotated with the frequencies of its call (ends[p])."""
    angles = torch.stack([p * formula_frequencies(args, scaling, args.max_seq_len, int(e))
                          for p, e in enumerate(ends)])  # (seq, hd/2)
    return meta_reference_logits(state, args, ids, angles)


def write_all(out: Path) -> dict:
    """Every case's references into ``out`` (``tests/golden/rope``), with its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (args, extra, seed, cases) in CASES.items():
        config = hf_config_json(args, extra)
        state = meta_state(args, seed)
        model = hf_model(args, config, state)
        rng = np.random.default_rng(seed)
        longest = max(n for n, _ in cases.values())
        ids = np.concatenate([[BOS], rng.integers(3, args.vocab_size, longest - 1)]).astype(np.int64)
        columns = (np.arange(args.vocab_size) if args.vocab_size <= LOGIT_COLUMNS else
                   np.unique(np.concatenate([rng.choice(args.vocab_size, LOGIT_COLUMNS - 8, replace=False),
                                             [0, 1, 2, 32007, 32008, 32009, 32010, args.vocab_size - 1]])))
        arrays = {"ids": ids, "columns": columns}
        for case, (n, prefill) in cases.items():
            ends = call_ends(n, prefill)
            hf = hf_logits(model, ids[:n], prefill)[:, columns]
            formula = formula_logits(args, extra.get("rope_scaling"), state, ids[:n], ends)[:, columns]
            gap = float(np.abs(hf - formula).max())
            assert gap < 2e-5, f"{name}/{case}: HF and the float64 formulas differ by {gap:.2e}"
            assert hf.std() > 0.5, f"{name}/{case}: logits too flat (std {hf.std():.2f}) to catch bugs"
            arrays.update({f"{case}_ends": ends, f"{case}_hf": hf, f"{case}_formula": formula})
            print(f"  {name}/{case:<7} {n} positions (prefill {prefill}), logits std {hf.std():.2f}, "
                  f"|HF - formulas| {gap:.1e}")
        meta = {"args": args.to_params(), "seed": seed, "config_json": config, "cases": list(cases)}
        np.savez_compressed(out / f"{name}.npz", meta=json.dumps(meta), **arrays)
        manifest[name] = {"reference": f"rope/{name}.npz", "cases": {c: {"positions": n, "prefill": p}
                                                                     for c, (n, p) in cases.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(manifest)} RoPE fixtures to {out} ({size / 1e3:.0f} kB)")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "rope")
    write_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
