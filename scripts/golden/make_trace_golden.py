#!/usr/bin/env python
"""Write ``tests/golden/trace/``: Hugging Face's float64 activations, layer by layer, of the golden models.

For every model under tests/golden/ (and ../shared's stories260K) this runs
transformers' ``LlamaForCausalLM`` in true float64 (``golden_reference.float64_hf``)
with ``output_hidden_states=True`` and writes the trace format llama2np reads
(docs/trace.md): ``ids``, ``hidden_states`` exactly as HF returns them,
``final_layer_output`` (the input of HF's final norm, caught by a hook) and
``logits``. The grouped-query model ``gqa2`` also gets every step of every
layer, taken from HF's modules with forward hooks and from its
``apply_rotary_pos_emb``, q and k reordered from HF's rotate-half layout to
Meta's interleaved pairs: the recipe docs/trace.md gives, run for real.

The models are rebuilt from the committed Meta checkpoints (``torch.load``,
Meta -> HF row order), and HF's logits must equal the committed reference
logits, so these activations belong to the same models. Nothing here imports
llama2np.

Usage (needs the ``reference`` extra: torch, transformers; deterministic):
    python scripts/golden/make_trace_golden.py [--out tests/golden]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

from golden_reference import float64_hf
from make_golden import REPO, Spec, hf_config, meta_to_hf_rows, stories260k_model

# name in the trace -> (checkpoint directory under tests/golden, reference.npz, every step?)
MODELS = {
    "mha": ("mha", "mha/reference.npz", False),
    "gqa2": ("gqa2", "gqa2/reference.npz", True),
    "mqa_bf16": ("mqa_bf16", "mqa_bf16/reference.npz", False),
    "ffn_mult": ("ffn_mult", "ffn_mult/reference.npz", False),
    "layouts_float32": ("layouts/meta_fp32", "layouts/reference_float32.npz", False),
    "layouts_bfloat16": ("layouts/meta_bf16", "layouts/reference_bfloat16.npz", False),
}
STORIES_TOKENS = 16  # stories260K: the first ids of its reference (a 5-layer, 64-wide trace stays small)


@torch.no_grad()
def model_from_meta(directory: Path, spec: Spec) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding the Meta checkpoint's weights (stored dtype kept)."""
    state = torch.load(directory / "consolidated.00.pth", map_location="cpu", weights_only=True)
    config = hf_config(spec)
    config.intermediate_size = state["layers.0.feed_forward.w1.weight"].shape[0]
    model = LlamaForCausalLM(config).to(state["output.weight"].dtype)
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(spec.n_layers):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        hf[p + "self_attn.q_proj.weight"] = meta_to_hf_rows(state[m + "attention.wq.weight"], spec.n_heads)
        hf[p + "self_attn.k_proj.weight"] = meta_to_hf_rows(state[m + "attention.wk.weight"], spec.n_kv_heads)
        for hf_name, meta_name in (("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                                   ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                                   ("mlp.up_proj", "feed_forward.w3"), ("input_layernorm", "attention_norm"),
                                   ("post_attention_layernorm", "ffn_norm")):
            hf[p + hf_name + ".weight"] = state[m + meta_name + ".weight"]
    model.load_state_dict(hf, strict=True)
    return model


def rotate_half_to_meta(x: np.ndarray) -> np.ndarray:
    """q or k (n, heads, head_dim) from HF's rotate-half layout (real parts, then imaginary parts) to
    Meta's interleaved pairs (real, imaginary, real, ...)."""
    n, heads, hd = x.shape
    return x.reshape(n, heads, 2, hd // 2).swapaxes(2, 3).reshape(n, heads, hd)


@torch.no_grad()
def hf_trace(model: LlamaForCausalLM, ids: np.ndarray, steps: bool) -> dict[str, np.ndarray]:
    """The trace of one sequence through an HF Llama: hidden_states, final_layer_output, logits (and steps)."""
    arrays: dict[str, np.ndarray] = {}
    n = len(ids)

    def keep(name, reshape=None):
        def hook(module, inputs, output):
            out = (output[0] if isinstance(output, tuple) else output)[0]  # drop the batch axis
            arrays[name] = (out.reshape(n, *reshape) if reshape else out).numpy().copy()
        return hook

    hooks = [model.model.norm.register_forward_hook(
        lambda module, inputs, output: arrays.__setitem__("final_layer_output", inputs[0][0].numpy().copy()))]
    rotated = []  # (q, k) after RoPE of each layer in turn, (batch, heads, seq, head_dim)
    original_rope = modeling_llama.apply_rotary_pos_emb
    if steps:
        cfg = model.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        for i, layer in enumerate(model.model.layers):
            p = f"layers.{i}."
            hooks += [layer.input_layernorm.register_forward_hook(keep(p + "attention_norm")),
                      layer.self_attn.v_proj.register_forward_hook(keep(p + "v", (cfg.num_key_value_heads, hd))),
                      layer.self_attn.o_proj.register_forward_hook(keep(p + "attention")),
                      layer.post_attention_layernorm.register_forward_hook(keep(p + "ffn_norm")),
                      layer.mlp.register_forward_hook(keep(p + "feed_forward"))]

        def recording_rope(q, k, *args, **kwargs):
            q, k = original_rope(q, k, *args, **kwargs)
            rotated.append((q, k))
            return q, k

        modeling_llama.apply_rotary_pos_emb = recording_rope
    try:
        out = model(torch.from_numpy(ids)[None], use_cache=False, output_hidden_states=True)
    finally:
        modeling_llama.apply_rotary_pos_emb = original_rope
        for h in hooks:
            h.remove()
    for i, (q, k) in enumerate(rotated):
        arrays[f"layers.{i}.q"] = rotate_half_to_meta(q[0].transpose(0, 1).numpy())
        arrays[f"layers.{i}.k"] = rotate_half_to_meta(k[0].transpose(0, 1).numpy())
    arrays["hidden_states"] = torch.stack([h[0] for h in out.hidden_states]).numpy()
    arrays["logits"] = out.logits[0].numpy()
    arrays["ids"] = np.asarray(ids, dtype=np.int64)
    return arrays


def check_and_save(path: Path, name: str, model: LlamaForCausalLM, ids: np.ndarray, logits: np.ndarray,
                   steps: bool, meta: dict) -> dict:
    trace = hf_trace(float64_hf(model), ids, steps)
    gap = float(np.abs(trace["logits"] - logits).max())
    assert gap < 1e-12, f"{name}: HF logits differ from the committed reference by {gap:.1e}"
    assert trace["hidden_states"].dtype == np.float64 and trace["hidden_states"].shape[0] == meta["n_layers"] + 1
    del trace["logits"]  # the committed reference.npz holds them already
    np.savez_compressed(path, **trace)  # a trace file as llama2np reads it; what it is of goes to the manifest
    print(f"  {name:<18} {len(ids)} tokens, {len(trace) - 1} arrays, |HF - reference logits| {gap:.1e}, "
          f"{path.stat().st_size / 1e3:.0f} kB")
    return {"trace": str(path.relative_to(path.parents[1])), "steps": steps, **meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden")
    golden = parser.parse_args().out
    out = golden / "trace"
    out.mkdir(exist_ok=True)
    manifest = {}
    for name, (directory, reference, steps) in MODELS.items():
        with np.load(golden / reference) as z:
            ids, logits, meta = z["ids"], z["logits"], json.loads(str(z["meta"]))
        spec = Spec(**{k: v for k, v in meta.items() if k != "hidden_dim"})
        model = model_from_meta(golden / directory, spec)
        manifest[name] = {"checkpoint": directory, "storage": spec.storage,
                          **check_and_save(out / f"{name}.npz", name, model, ids, logits, steps,
                                           {"n_layers": spec.n_layers, "checkpoint": directory})}
    model, spec, header = stories260k_model()
    with np.load(golden / "stories260K" / "reference.npz") as z:
        ids, logits = z["ids"][:STORIES_TOKENS], z["logits"][:STORIES_TOKENS]
    manifest["stories260K"] = {"shared": ["stories260K", "stories260K.bin"], "storage": "float32",
                               **check_and_save(out / "stories260K.npz", "stories260K", model, ids, logits, False,
                                                {"n_layers": spec.n_layers, "header": header})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(manifest)} traces to {out}")


if __name__ == "__main__":
    main()
