"""Quantized GGUF tensors in their exact form (int8 codes, per-block float32 scales and offsets).

The reference is always ``gguf.quants.dequantize`` (llama.cpp's gguf-py, written
independently of llama2np's block decoding): decoded values must equal its
values, and float64 logits of a quantized file must equal float64 logits of the
same model with every tensor replaced by gguf's dequantized values (an F32 file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason='GGUF support needs the "gguf" extra: pip install -e ".[gguf]"')
from gguf import GGMLQuantizationType as T  # noqa: E402

from llama2np import CheckpointError, Llama2  # noqa: E402
from llama2np.distributed.shard import Shard, shard_state  # noqa: E402
from llama2np.loaders import load_checkpoint  # noqa: E402
from llama2np.loaders.gguf_blocks import KINDS, decode_tensor, form_bytes  # noqa: E402
from llama2np.model.linear import Linear  # noqa: E402
from llama2np.model.quant_blocks import BlockQuantTensor, make_block_linear  # noqa: E402
from llama2np.testing import gguf_export as ge  # noqa: E402

#: byte offsets of each type's fp16 scale(s) in a block: random bytes there would make huge or NaN
#: scales, so tests put small random fp16 numbers there
FP16_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
           "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_QUANTIZES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the types of the int8 form gguf.quants can write
DEQUANTIZED = ("TQ1_0", "TQ2_0", "MXFP4")  # gguf.quants writes them too; no int8 form: gguf's float32 values


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Random blocks of ``kind`` (uint8 (rows, bytes)): every code and sub-block scale random, fp16 scales
    small so weights spread about ``std``."""
    per, _, size, _, _, _ = KINDS[kind]
    raw = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    spread = {"Q2_K": 8, "Q3_K": 40, "Q4_K": 150, "Q5_K": 300, "Q6_K": 1400}.get(kind, 8)
    for at in FP16_AT[kind]:
        d = (std / spread * (0.5 + rng.random((rows, cols // per, 1)))).astype(np.float16)
        raw[:, :, at:at + 2] = d.view(np.uint8)
    if kind == "Q8_0":  # -128 is no quantizer's code
        codes = raw[:, :, 2:]
        codes[codes == 128] = 129
    return raw.reshape(rows, -1)


def gguf_values(raw: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, T[kind]).astype(np.float64)


# --- the form is exact ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decoded_values_are_gguf_values(kind: str):
    rng = np.random.default_rng(list(KINDS).index(kind))
    raw = random_blocks(kind, 6, 512, rng)
    w = decode_tensor(raw, kind, (6, 512), "blk.0.attn_q.weight")
    assert w.q.dtype == np.int8 and w.scale.dtype == np.float32 and w.nbytes == form_bytes(kind, 6, 512)
    np.testing.assert_array_equal(np.asarray(w), gguf_values(raw, kind))
    np.testing.assert_array_equal(w[[5, 0]], gguf_values(raw, kind)[[5, 0]])  # rows as the embedding looks them up


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_byte_of_a_block_is_read_where_gguf_reads_it(kind: str):
    """Changing any one byte of a block (a scale, an offset, a code, a high bit) changes exactly the
    weights gguf says it changes, by exactly as much."""
    rng = np.random.default_rng(7)
    per, _, size, _, _, _ = KINDS[kind]
    raw = random_blocks(kind, 1, per, rng)
    base = gguf_values(raw, kind)
    fp16 = {at + i for at in FP16_AT[kind] for i in (0, 1)}
    for byte in range(size):
        changed = raw.copy()
        changed[0, byte] ^= 0x01 if byte in fp16 else 0xA5  # a scale's low mantissa bit / many code bits
        if kind == "Q8_0" and changed[0, byte] == 128:
            changed[0, byte] = 127
        want = gguf_values(changed, kind)
        assert not np.array_equal(want, base), (kind, byte)
        np.testing.assert_array_equal(np.asarray(decode_tensor(changed, kind, (1, per), "t")), want,
                                      err_msg=f"{kind} byte {byte}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3, 12, 400])
def test_block_linear_is_the_product_with_the_values(n: int, dtype):
    """y = x @ W.T over stacked parts of different kinds (one block size, and a mix), tile by tile."""
    rng = np.random.default_rng(n)
    cols = 512
    parts = [decode_tensor(random_blocks(k, r, cols, rng), k, (r, cols), k) for k, r in
             (("Q4_K", 96), ("Q4_K", 40), ("Q6_K", 40))]
    dense = np.concatenate([np.asarray(p) for p in parts])
    x = rng.standard_normal((n, cols))
    want = x @ dense.T
    for stack in (parts[:2], parts):
        lin = make_block_linear(stack, dtype)
        got = lin(x.astype(dtype))
        rows = sum(p.shape[0] for p in stack)
        assert got.shape == (n, rows) and got.dtype == dtype
        tol = 1e-12 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(got, want[:, :rows], rtol=0, atol=tol * np.abs(want).max())
        assert [g.shape[-1] for g in lin.split(got)] == [p.shape[0] for p in stack]


def test_a_float_part_stacks_with_block_parts():
    rng = np.random.default_rng(1)
    q = decode_tensor(random_blocks("Q8_0", 64, 256, rng), "Q8_0", (64, 256), "q")
    f = rng.standard_normal((32, 256)).astype(np.float32)
    x = rng.standard_normal((2, 256))
    got = make_block_linear([q, f], np.float64)(x)
    np.testing.assert_allclose(got, x @ np.concatenate([np.asarray(q), f]).T, rtol=0, atol=1e-12)
    assert isinstance(make_block_linear([f], np.float64), Linear)


# --- whole models: the quantized file computes what its values compute ------------------------

SMALL = ge.HParams(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=40, context_length=32)
WIDE = ge.HParams(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=40, context_length=32)


def quantized_file(tmp_path: Path, kind: str, h: ge.HParams, seed: int = 0) -> Path:
    """A model whose 2-D tensors are ``kind`` (gguf's quantizer, or random k-quant blocks); Q4_K_M: Q4_K + Q6_K."""
    if kind in (*GGUF_QUANTIZES, *DEQUANTIZED, "Q4_K_M"):
        types, produce = ge.synthetic(h, kind, seed=seed)
    else:
        base_types, base = ge.synthetic(h, "F32", seed=seed)
        types = {n: (T.F32 if t == T.F32 and len(ge.meta_shapes(h)[n]) == 1 else T[kind]) for n, t in base_types.items()}
        shapes = ge.meta_shapes(h)

        def produce(name: str) -> np.ndarray:
            if types[name] == T.F32:
                return base(name)
            rng = np.random.default_rng([seed, list(shapes).index(name)])
            std = 1.0 if name == "tok_embeddings.weight" else 1 / np.sqrt(shapes[name][1])
            return random_blocks(kind, *shapes[name], rng, std=std)
    return ge.write_gguf(tmp_path / f"{kind}.gguf", h, types, produce)


def dequantized_copy(path: Path, out: Path, h: ge.HParams) -> Path:
    """The same model as an F32 GGUF holding gguf.quants.dequantize's values of every tensor."""
    values = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
              .reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors}
    types = {n: T.F32 for n in ge.meta_shapes(h)}
    return ge.write_gguf(out, h, types, lambda n: values[ge.gguf_name(n)])


IDS = [1, 7, 3, 22, 9, 30, 2, 15, 11, 38, 5]


@pytest.mark.parametrize("kind", [*GGUF_QUANTIZES, *K_QUANTS, "Q4_K_M", *DEQUANTIZED])
def test_float64_logits_equal_those_of_the_stored_values(tmp_path: Path, kind: str):
    per = 256 if kind in (*K_QUANTS, "Q4_K_M", "TQ1_0", "TQ2_0") else 32
    h = WIDE if per == 256 else SMALL
    path = quantized_file(tmp_path, kind, h)
    got = Llama2.from_pretrained(path, dtype="float64").logits(IDS)
    want = Llama2.from_pretrained(dequantized_copy(path, tmp_path / "f32.gguf", h), dtype="float64").logits(IDS)
    assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    f32 = Llama2.from_pretrained(path, dtype="float32").logits(IDS)
    assert np.abs(f32 - want).max() <= 1e-3


def test_quantize_int8_of_a_gguf(tmp_path: Path):
    path = quantized_file(tmp_path, "Q4_K_M", WIDE)
    want = Llama2.from_pretrained(path, dtype="float64").logits(IDS)
    got = Llama2.from_pretrained(path, quantize="int8").logits(IDS)
    assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_tensor_parallel_slices_are_the_values_slices(tmp_path: Path):
    path = quantized_file(tmp_path, "Q4_K_M", WIDE)
    ckpt = load_checkpoint(path)
    for rank in range(2):
        part = shard_state(load_checkpoint(path).state, ckpt.args, Shard(rank, 2))
        for name, columns in (("layers.1.attention.wq.weight", False), ("layers.1.feed_forward.w2.weight", True)):
            full, cut = np.asarray(ckpt.state[name]), part[name]
            assert isinstance(cut, BlockQuantTensor)
            n = (full.shape[1] if columns else full.shape[0]) // 2
            want = full[:, rank * n:(rank + 1) * n] if columns else full[rank * n:(rank + 1) * n]
            np.testing.assert_array_equal(np.asarray(cut), want)


# --- bad input -----------------------------------------------------------------------------


def one_tensor(kind: str, raw: np.ndarray, shape=(4, 256)):
    return decode_tensor(raw, kind, shape, "blk.3.ffn_up.weight")


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
def test_truncated_block(kind: str):
    raw = random_blocks(kind, 4, 256, np.random.default_rng(0))
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*truncated"):
        one_tensor(kind, raw.reshape(-1)[:-5])


@pytest.mark.parametrize("kind", ["Q4_K", "Q4_1", "Q6_K", "Q3_K"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_scale_or_offset_not_finite(kind: str, bad: float):
    raw = random_blocks(kind, 4, 256, np.random.default_rng(0))
    per, _, size, _, _, _ = KINDS[kind]
    blocks = raw.reshape(4, -1, size)
    at = FP16_AT[kind][-1]  # the offset's fp16 where there is one
    blocks[2, 0, at:at + 2] = np.array([bad], np.float16).view(np.uint8)
    what = "offset" if len(FP16_AT[kind]) > 1 else "scale"
    with pytest.raises(CheckpointError, match=rf"blk\.3\.ffn_up\.weight: a {kind} {what} is NaN or infinite \(row 2"):
        one_tensor(kind, raw)


def test_code_out_of_range():
    raw = random_blocks("Q8_0", 4, 256, np.random.default_rng(0))
    raw.reshape(4, -1, 34)[1, 3, 10] = 128  # int8 -128
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight: a Q8_0 code is outside -127\.\.127 "
                                              r"\(row 1, block 3\)"):
        one_tensor("Q8_0", raw)


def test_bad_tensor_named_when_the_model_loads(tmp_path: Path):
    path = quantized_file(tmp_path, "Q4_K", WIDE)
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    tensor.data.reshape(-1)[0:2] = np.array([np.nan], np.float16).view(np.uint8)  # the first block's d
    reader.data.flush()
    del reader, tensor
    with pytest.raises(CheckpointError, match=r"tensor blk\.1\.attn_v\.weight: a Q4_K scale is NaN"):
        Llama2.from_pretrained(path)
