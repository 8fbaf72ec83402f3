#!/usr/bin/env python
"""Write ``tests/golden/gguf/llamacpp_*.gguf``: a tiny random Llama quantized by llama.cpp's own tools.

A random HF ``LlamaForCausalLM`` (256 wide, so every matrix is whole k-quant
super-blocks; the 512-piece stories260K vocabulary, so the files stay small) is
saved as safetensors beside ``tok512.model``, converted to an F32 GGUF by
llama.cpp's ``convert_hf_to_gguf.py`` and quantized by ``llama-quantize`` to
Q8_0, Q4_0, Q4_K_M and Q6_K. The tests compare llama2np's logits of each file
with its logits of the values the file stores (``gguf.quants.dequantize``),
so no reference logits are stored. Nothing here imports llama2np.

Usage (needs the ``reference`` extra and a llama.cpp checkout with its tools built):
    python scripts/golden/make_llamacpp_quant_golden.py --llama-cpp path/to/llama.cpp --bin path/to/llama.cpp/bin
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
TYPES = ("Q8_0", "Q4_0", "Q4_K_M", "Q6_K")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py, gguf-py)")
    parser.add_argument("--bin", type=Path, required=True, help="directory holding llama-quantize")
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "data" / "stories260K" / "tok512.model")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "gguf")
    a = parser.parse_args()
    torch.manual_seed(27)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights spread as in a trained model (HF's init std 0.02 makes flat logits)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if p.shape[0] != config.vocab_size or p is model.lm_head.weight
                          else 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf, safe_serialization=True)
        shutil.copyfile(a.tokenizer, hf / "tokenizer.model")
        f32 = Path(tmp) / "f32.gguf"
        env = dict(os.environ, PYTHONPATH=str(a.llama_cpp / "gguf-py"))
        subprocess.run([sys.executable, str(a.llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(f32)], check=True, env=env)
        for qtype in TYPES:
            out = a.out / f"llamacpp_{qtype.lower()}.gguf"
            subprocess.run([str(a.bin / "llama-quantize"), str(f32), str(out), qtype], check=True)
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
