"""Files llama.cpp's own tools quantized (``tests/golden/gguf/llamacpp_*.gguf``, made by
``scripts/golden/make_llamacpp_quant_golden.py``: convert_hf_to_gguf.py + llama-quantize) compute
what the values they store compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')

from llama2np import Llama2  # noqa: E402
from llama2np.cli.commands import main  # noqa: E402
from llama2np.model.quant_blocks import BlockLinear, BlockQuantTensor, StackedLinear  # noqa: E402
from llama2np.testing import gguf_export as ge  # noqa: E402
from test_golden import GOLDEN  # noqa: E402
from test_quant_blocks import dequantized_copy  # noqa: E402

FILES = {"Q8_0": {"Q8_0"}, "Q4_0": {"Q4_0", "Q6_K"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "Q6_K": {"Q6_K"}}
SHAPE = ge.HParams(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=512, context_length=64)
IDS = [1, 403, 37, 260, 9, 88, 511, 2, 150, 77, 300, 12, 45, 199, 6, 480]


def path_of(ftype: str) -> Path:
    return GOLDEN / "gguf" / f"llamacpp_{ftype.lower()}.gguf"


@pytest.mark.parametrize("ftype", sorted(FILES))
def test_llama_quantize_file_computes_its_stored_values(tmp_path: Path, ftype: str):
    path = path_of(ftype)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    assert kinds == FILES[ftype]
    model = Llama2.from_pretrained(path, dtype="float64")
    assert all(isinstance(m, (BlockLinear, StackedLinear)) for m in model.model.linears())
    assert isinstance(model.model.tok_embeddings, BlockQuantTensor)
    got = model.logits(IDS)
    want = Llama2.from_pretrained(dequantized_copy(path, tmp_path / "f32.gguf", SHAPE), dtype="float64").logits(IDS)
    assert np.abs(want).max() > 1 and np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    # the KV cache path (one token at a time) agrees too
    cache = model.model.new_cache(max_seq_len=len(IDS))
    steps = np.concatenate([model.model.forward(np.array([[t]]), i, cache)[0] for i, t in enumerate(IDS)])
    assert np.abs(steps - want).max() <= 1e-5


def test_compare_and_logits_commands_read_a_quantized_file(tmp_path: Path, capsys):
    out = tmp_path / "logits.npz"
    ids = ",".join(map(str, IDS))
    assert main(["logits", "--model", str(path_of("Q4_K_M")), "--ids", ids, "--out", str(out)]) == 0
    assert np.load(out)["logits"].shape[-1] == SHAPE.vocab_size
    assert main(["compare", "--model", str(path_of("Q8_0")), "--other", str(path_of("Q4_K_M")), "--ids", ids]) == 0
    assert "kl" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_plan_counts_the_bytes_the_model_holds(ftype: str):
    from llama2np.distributed.memory_plan import memory_plan
    from llama2np.loaders.gguf import tensor_types

    args, types = tensor_types(path_of(ftype))
    plan = memory_plan(args, 1, tensor_types=types)
    model = Llama2.from_pretrained(path_of(ftype)).model
    held = sum(p.nbytes for layer in model.layers for m in (layer.attention.wqkv, layer.attention.wo,
                                                            layer.feed_forward.w13, layer.feed_forward.w2)
               for p in m.parts)
    assert plan.actor_weights == held
    driver = model.tok_embeddings.nbytes + sum(p.nbytes for p in model.output.parts)
    assert 0 < plan.driver_weights - driver < 64 * 1024  # norms and the RoPE table
