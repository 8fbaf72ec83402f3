"""Reference logits for the golden fixtures: HF transformers in true float64, and Meta's formulas.

Used by ``make_golden.py``. Two independent float64 computations of the same
model, which must agree to ~1e-12: HF's ``LlamaForCausalLM`` (rotate-half
RoPE, its own GQA) and a direct transcription of Meta's ``model.py``
(complex-number RoPE on interleaved pairs) from the Meta-layout weights.
"""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

# --- HF in true float64 --------------------------------------------------------------------
# model.double() alone is not float64 in transformers 5.x: LlamaRotaryEmbedding.forward
# computes position * inv_freq, cos and sin in float32 (inv_freq itself is built in
# float32), LlamaRMSNorm upcasts to float32 (a downcast for a float64 input), and the
# eager attention runs softmax in float32. Each would cap agreement near 1e-7 and make a
# float64 llama2np test (1e-5 on logits of size ~5) measure HF's rounding, not ours.
# So the two modules' forwards are replaced by the same formulas computed in the input's
# dtype, and attention uses torch's SDPA, which computes in float64 for float64 inputs.
# meta_reference_logits below is the proof: it agrees with the patched HF to ~1e-12.


def _rotary_forward_float64(self, x, position_ids):
    head_dim = self.config.hidden_size // self.config.num_attention_heads
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq  # (batch, seq, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's rotate-half layout
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rms_norm_forward_native(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_hf_keep_rope(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A float64 copy of ``model`` with RMSNorm and attention in float64 and HF's own RoPE untouched
    (its frequencies in float32, its RoPE scaling: ``make_rope_golden.py``)."""
    ref = copy.deepcopy(model).double().eval()
    ref.config._attn_implementation = "sdpa"
    for module in ref.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_rms_norm_forward_native, module)
    return ref


def float64_hf(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A float64 copy of ``model`` that really computes every step in float64."""
    ref = float64_hf_keep_rope(model)
    rotary = ref.model.rotary_emb
    rotary.forward = types.MethodType(_rotary_forward_float64, rotary)
    cos, _ = rotary(torch.zeros(1, dtype=torch.float64), torch.arange(4)[None])
    assert cos.dtype == torch.float64, "rotary patch did not take"
    return ref


@torch.no_grad()
def hf_logits(ref: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    out = ref(torch.from_numpy(ids)[None], use_cache=False).logits[0]
    assert out.dtype == torch.float64
    return out.numpy()


# --- an independent float64 transcription of Meta's model.py -------------------------------


def meta_reference_logits(state: dict[str, torch.Tensor], spec, ids: np.ndarray,
                          angles: torch.Tensor | None = None) -> np.ndarray:
    """Meta's forward pass (complex-number RoPE on interleaved pairs) in float64 torch.

    state: Meta names and row order; spec: a ``make_golden.Spec`` (or anything with its fields:
    head_dim, rope_theta, norm_eps, n_layers, n_heads, n_kv_heads); ids: (seq,); angles: the
    rotation angle of each position and pair, (seq, hd/2) float64 (default: Meta's, p * theta^(-2i/d)).
    """
    w = {k: v.to(torch.float64) for k, v in state.items()}
    hd, seq = spec.head_dim, len(ids)
    if angles is None:
        freqs = 1.0 / spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[: hd // 2] / hd)
        angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)  # (seq, hd/2)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * weight

    def rope(x):  # (seq, heads, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * cis[:, None, :]).flatten(2)

    mask = torch.triu(torch.full((seq, seq), float("-inf"), dtype=torch.float64), diagonal=1)
    h = w["tok_embeddings.weight"][torch.from_numpy(ids)]
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).view(seq, spec.n_heads, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(seq, spec.n_kv_heads, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(seq, spec.n_kv_heads, hd)
        rep = spec.n_heads // spec.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        att = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(seq, -1)
        h = h + att @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return (norm(h, w["norm.weight"]) @ w["output.weight"].T).numpy()


def reference_logits(model: LlamaForCausalLM, meta_state: dict[str, torch.Tensor], spec,
                     ids: np.ndarray) -> np.ndarray:
    """HF float64 logits, checked against the Meta transcription and for spread."""
    logits = hf_logits(float64_hf(model), ids)
    meta = meta_reference_logits(meta_state, spec, ids)
    gap = float(np.abs(logits - meta).max())
    assert gap < 1e-10, f"{spec.name}: HF float64 and Meta-formula logits differ by {gap:.2e}"
    std = float(logits.std())
    assert std > 0.5, f"{spec.name}: logits too flat (std {std:.3f}) to catch bugs"
    print(f"  {spec.name:<10} storage={spec.storage:<8} logits std {std:.2f}  |HF - Meta formulas| {gap:.1e}")
    return logits
