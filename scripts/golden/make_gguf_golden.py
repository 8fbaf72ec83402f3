#!/usr/bin/env python
"""Write ``tests/golden/gguf/``: the random golden models as GGUF files, with float64 reference logits.

* ``f32.gguf``, ``f16.gguf``, ``q8_0.gguf``: the grouped-query model of
  ``tests/golden/layouts`` (read from its HF safetensors directory with
  transformers), converted as llama.cpp's ``convert_hf_to_gguf.py`` does: q/k
  rows permuted from HF's rotate-half order back to Meta's pairs, norms F32.
* ``q4_k_m.gguf``: a model wide enough for k-quants (256 columns) whose 2-D
  tensors are *random* Q4_K / Q6_K blocks (the ``gguf`` package cannot
  quantize k-quants), mixed as llama-quantize's Q4_K_M.

Every file's reference logits come from HF transformers in float64 (see
``golden_reference.py``) over the weights ``gguf.GGUFReader`` +
``gguf.quants.dequantize`` read back from that file, exactly as dequantized
(float32, widened to float64): llama2np computes with the values a quantized
file stores. The F32 file is also checked by the tests against the layouts model's
own reference. Nothing here imports llama2np.

Usage (needs the ``reference`` and ``gguf`` extras): python scripts/golden/make_gguf_golden.py
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM

from llama2np.testing import gguf_export as ge
from golden_reference import reference_logits
from make_golden import LAYOUT_SPEC, Spec, hf_to_meta_rows, random_ids, save_reference

REPO = Path(__file__).resolve().parents[2]
KQUANT_SPEC = Spec("q4_k_m", dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=256,
                   seed=6)


def hparams(spec: Spec, hidden_dim: int) -> ge.HParams:
    return ge.HParams(spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, hidden_dim, spec.vocab_size,
                      spec.norm_eps, spec.rope_theta, spec.max_seq_len)


def gguf_state(model: LlamaForCausalLM, spec: Spec) -> dict[str, np.ndarray]:
    """The HF model's float32 weights under Meta's names, q/k rows permuted as convert_hf_to_gguf.py does."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    hf_names = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(spec.n_layers):
        for meta, hf in hf_names.items():
            w = sd[f"model.layers.{i}.{hf}"]
            if meta == "attention.wq.weight":
                w = ge.hf_to_gguf_rows(w, spec.n_heads)
            elif meta == "attention.wk.weight":
                w = ge.hf_to_gguf_rows(w, spec.n_kv_heads)
            out[f"layers.{i}.{meta}"] = w
    return out


def read_back(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF by its GGUF name, as gguf dequantizes it (float32)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        out[t.name] = w.reshape(tuple(reversed(t.shape.tolist())))
    return out


#: a layer's GGUF name -> Meta name
GGUF_TO_META = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def hf_model_from_gguf(path: Path, spec: Spec, hidden_dim: int) -> tuple[LlamaForCausalLM, dict]:
    """An HF model (float64 weights) holding exactly what the GGUF holds, and the same in Meta's names."""
    from make_golden import hf_config, load_meta_state

    w = {k: v.double() for k, v in read_back(path).items()}
    config = hf_config(spec)
    config.intermediate_size = hidden_dim
    model = LlamaForCausalLM(config).double()
    meta = {"tok_embeddings.weight": w["token_embd.weight"], "norm.weight": w["output_norm.weight"],
            "output.weight": w["output.weight"]}
    for i in range(spec.n_layers):  # GGUF holds q/k in Meta's order
        meta.update({f"layers.{i}.{m}.weight": w[f"blk.{i}.{g}.weight"] for g, m in GGUF_TO_META.items()})
    load_meta_state(model, meta, spec.n_heads, spec.n_kv_heads)
    return model, meta


def write_all(golden: Path) -> dict:
    out = golden / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}

    layouts = LlamaForCausalLM.from_pretrained(golden / "layouts" / "hf_fp32", dtype=torch.float32)
    spec = LAYOUT_SPEC
    state = gguf_state(layouts, spec)
    # the GGUF q/k rows must be Meta's, i.e. HF's permutation undone
    assert np.array_equal(state["layers.0.attention.wq.weight"],
                          hf_to_meta_rows(layouts.model.layers[0].self_attn.q_proj.weight.detach(), spec.n_heads).numpy())
    h = hparams(spec, spec.hidden_dim)
    jobs = [(ftype, h, spec, lambda n, ftype=ftype: ge.encode(state[n], ge.tensor_type(n, ftype, h.n_layers)))
            for ftype in ("F32", "F16", "Q8_0")]
    kspec = replace(KQUANT_SPEC, max_seq_len=64)
    kh = hparams(kspec, 256)
    _, kproduce = ge.synthetic(kh, "Q4_K_M", seed=kspec.seed)
    jobs.append(("Q4_K_M", kh, kspec, kproduce))

    for ftype, hp, sp, produce in jobs:
        name = ftype.lower()
        types = {n: ge.tensor_type(n, ftype, hp.n_layers) for n in ge.meta_shapes(hp)}
        path = ge.write_gguf(out / f"{name}.gguf", hp, types, produce, name=f"llama2np golden {sp.name} {ftype}")
        model, meta_state = hf_model_from_gguf(path, sp, hp.hidden_dim)
        ids = random_ids(sp)
        fixture = replace(sp, name=f"gguf/{name}")
        logits = reference_logits(model, meta_state, fixture, ids)
        save_reference(out / f"reference_{name}.npz", ids, logits, **asdict(fixture), hidden_dim=hp.hidden_dim,
                       gguf_type=ftype)
        manifest[f"gguf/{name}"] = {"kind": "gguf", "file": f"gguf/{name}.gguf",
                                    "reference": f"gguf/reference_{name}.npz", "type": ftype}
    manifest["gguf/f32"]["same_weights_as"] = "layouts/reference_float32.npz"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(manifest)} GGUF fixtures to {out} ({size / 1e6:.2f} MB)")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=REPO / "tests" / "golden")
    write_all(parser.parse_args().golden)


if __name__ == "__main__":
    main()
