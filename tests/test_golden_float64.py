"""float64 logits at float64 precision: every layout and every forward path within 1e-12 of the references.

The references (tests/golden, see its README) are Hugging Face's float64 logits with
its float32 RoPE tables, RMSNorm upcast and softmax patched to float64, which agree
with a float64 transcription of Meta's ``model.py`` to ~1e-14; ``meta_formulas``
below is a second, NumPy transcription (real cos/sin on the (even, odd) pairs, key and
value heads repeated as Meta's ``repeat_kv`` does), checked against them here too.
In float64 llama2np differs from them only by summation order, a few 1e-15 of the
largest logit, so the bound is 1e-12 of it: a float32 RoPE angle, a float32 softmax or a
float32 widening anywhere shows as ~1e-7. (Against unpatched HF, whose RoPE
frequencies are float32, ~1e-6 is all one can ask: see test_golden.py.)

Paths: the whole sequence in one forward (prefill), one token at a time through the
KV cache, a batch whose rows decode at their own positions, bf16 storage widened tile
by tile, and tensor parallelism (the slices' partial sums, added here in one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from llama2np import Llama2, Transformer
from llama2np.distributed.shard import Shard, shard_state
from llama2np.loaders import load_checkpoint
from llama2np.model.kv_cache import KVCache
from llama2np.model.storage import to_float
from llama2np.model.transformer import build_layer, linear_maker

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
GGUF = json.loads((GOLDEN / "gguf" / "manifest.json").read_text())
RELATIVE = 1e-12  # of the largest reference logit: float64 rounding is ~1e-15 of it, float32's ~1e-7


def reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(GOLDEN / path) as z:
        return z["ids"], z["logits"]


def check(label: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float64 and got.shape == want.shape, (label, got.dtype, got.shape, want.shape)
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    print(f"\nfloat64 {label:<36} relative error {err:.1e}")
    assert err <= RELATIVE, f"{label}: float64 logits off by {err:.1e} of the largest logit (bound {RELATIVE:g})"


def meta_formulas(state, args, ids: np.ndarray) -> np.ndarray:
    """Meta's forward pass in float64 NumPy, written out: (seq,) ids -> (seq, vocab) logits."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in state.items() if not k.startswith("rope")}
    seq, hd, n_heads, n_kv = len(ids), args.head_dim, args.n_heads, args.n_kv_heads
    freqs = args.rope_theta ** -(np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    theta = np.arange(seq, dtype=np.float64)[:, None] * freqs  # (seq, hd/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def norm(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + args.norm_eps) * weight

    def rope(x):  # (seq, heads, hd): pair (2i, 2i+1) rotated by position * freqs[i]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    h = w["tok_embeddings.weight"][ids]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).reshape(seq, n_heads, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).reshape(seq, n_kv, hd))
        v = (x @ w[p + "attention.wv.weight"].T).reshape(seq, n_kv, hd)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        heads = []
        for head in range(n_heads):
            s = q[:, head] @ k[:, head].T / np.sqrt(hd)
            s[future] = -np.inf
            e = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append((e / e.sum(axis=-1, keepdims=True)) @ v[:, head])
        h = h + np.concatenate(heads, axis=-1) @ w[p + "attention.wo.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        a, b = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (a / (1 + np.exp(-a)) * b) @ w[p + "feed_forward.w2.weight"].T
    return norm(h, w["norm.weight"]) @ w["output.weight"].T


def one_at_a_time(model: Transformer, ids: np.ndarray) -> np.ndarray:
    """A 1-token prefill, then every token alone through the KV cache: (seq, vocab)."""
    cache = model.new_cache(1, len(ids))
    return np.concatenate([model.forward(ids[None, i:i + 1], i, cache)[0] for i in range(len(ids))])


def rows_at_own_positions(model: Transformer, ids: np.ndarray, lag: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of one batch, the same ids, the second ``lag`` positions behind: each row's logits."""
    lead, behind = len(ids) // 2 + lag, len(ids) // 2
    a, b = model.new_cache(1, len(ids)), model.new_cache(1, len(ids))
    rows = [list(model.forward(ids[None, :lead], 0, a)[0]), list(model.forward(ids[None, :behind], 0, b)[0])]
    cache = a.add_rows(lead, b, behind)
    pos = np.array([lead, behind])
    while pos[0] < len(ids):
        out = model.forward(ids[pos][:, None], pos, cache)  # (2, 1, vocab)
        rows[0].append(out[0, 0])
        rows[1].append(out[1, 0])
        pos += 1
    return np.array(rows[0]), np.array(rows[1])


CHECKPOINTS = [n for n in MANIFEST if MANIFEST[n]["kind"] in ("meta", "hf")]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_meta_and_hf_layouts_prefill_and_kv_cache(name):
    entry = MANIFEST[name]
    ids, want = reference(entry["reference"])
    llama = Llama2.from_pretrained(GOLDEN / entry["dir"], dtype="float64")
    assert llama.model.tiled == (entry["storage"] == "bfloat16")  # bf16 stays bf16, widened tile by tile
    check(f"{name} prefill", llama.model.forward(ids[None])[0], want)
    check(f"{name} kv cache", one_at_a_time(llama.model, ids), want)


@pytest.mark.parametrize("name", ["gqa2", "layouts/hf_bf16"])
def test_a_batch_of_rows_at_their_own_positions(name):
    entry = MANIFEST[name]
    ids, want = reference(entry["reference"])
    model = Llama2.from_pretrained(GOLDEN / entry["dir"], dtype="float64").model
    lead, behind = rows_at_own_positions(model, ids)
    check(f"{name} batch, leading row", lead, want)
    check(f"{name} batch, lagging row", behind, want[:len(behind)])
    both = model.forward(np.stack([ids, ids]))  # a batch prefill
    check(f"{name} batch prefill", both[1], want)


def test_the_references_are_metas_formulas():
    for name in ("gqa2", "mqa_bf16", "ffn_mult"):
        entry = MANIFEST[name]
        ids, want = reference(entry["reference"])
        ckpt = load_checkpoint(GOLDEN / entry["dir"])
        state = {k: to_float(ckpt.state[k], np.float64) for k in ckpt.state}
        check(f"{name} Meta's formulas", meta_formulas(state, ckpt.args, ids), want)


@pytest.mark.parametrize("name", sorted(GGUF))
def test_gguf(name):
    entry = GGUF[name]
    ids, want = reference(entry["reference"])
    llama = Llama2.from_pretrained(GOLDEN / entry["file"], dtype="float64")
    check(f"{name} prefill", llama.model.forward(ids[None])[0], want)
    check(f"{name} kv cache", one_at_a_time(llama.model, ids), want)


def test_llama2c_stories260k():
    entry = MANIFEST["stories260K"]
    ids, want = reference(entry["reference"])
    llama = Llama2.from_pretrained(shared_path(*entry["shared"]), dtype="float64")
    check("stories260K prefill", llama.model.forward(ids[None])[0], want)
    check("stories260K kv cache", one_at_a_time(llama.model, ids), want)


class _Summed:
    """One layer's attention or feed-forward as the sum of its tensor-parallel slices' outputs."""

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, x, *rest):
        if not rest:  # feed-forward
            return sum(p(x) for p in self.parts)
        start_pos, rotation, mask, ck, cv = (*rest, None, None)[:5]  # each slice has its own cache
        return sum(p(x, start_pos, rotation, mask, None if ck is None else ck[j], None if cv is None else cv[j])
                   for j, p in enumerate(self.parts))


class _SlicedCache:
    """A KV cache per slice (its own key/value heads), as each actor holds: k[i][j] is slice j's layer i."""

    def __init__(self, args, caches):
        self.caches, self.max_seq_len = caches, caches[0].max_seq_len
        self.batch_size = caches[0].batch_size

    def reserve(self, end):
        for c in self.caches:
            c.reserve(end)

    @property
    def k(self):
        return [[c.k[i] for c in self.caches] for i in range(len(self.caches[0].k))]

    @property
    def v(self):
        return [[c.v[i] for c in self.caches] for i in range(len(self.caches[0].v))]


class _SlicedModel(Transformer):
    """The driver's side of a tensor-parallel model with its slices in this process."""

    def __init__(self, ckpt, world):
        dtype = np.dtype(np.float64)
        slices = [shard_state(load_checkpoint(ckpt.source).state, ckpt.args, Shard(k, world)) for k in range(world)]
        self.kv_heads = [len(Shard(k, world).kv_heads(ckpt.args)) for k in range(world)]
        built = [[build_layer(ckpt.args, s, i, linear_maker(s, dtype)) for s in slices]
                 for i in range(ckpt.args.n_layers)]
        super().__init__(ckpt.args, ckpt.state, dtype, make_layer=lambda i: (
            _Summed([a for a, _ in built[i]]), _Summed([f for _, f in built[i]])))

    def linears(self):
        return [self.output]

    def new_cache(self, batch_size=1, max_seq_len=None):
        return _SlicedCache(self.args, [KVCache(self.args, batch_size, max_seq_len or self.args.max_seq_len,
                                                self.dtype, n) for n in self.kv_heads])


@pytest.mark.parametrize("world", [2, 6])
def test_tensor_parallel_slices(world):
    """gqa2 (6 heads, 2 kv heads) cut as the actors cut it (N=6: kv heads replicated); the partial sums."""
    entry = MANIFEST["gqa2"]
    ids, want = reference(entry["reference"])
    model = _SlicedModel(load_checkpoint(GOLDEN / entry["dir"]), world)
    check(f"gqa2 tensor parallel N={world} prefill", model.forward(ids[None])[0], want)
    check(f"gqa2 tensor parallel N={world} kv cache", one_at_a_time(model, ids), want)


def test_gguf_metadata_eps_and_rope_base(tmp_path):
    """mqa_bf16 (norm_eps 1e-6, rope_theta 1e6, not the defaults) written as an F32 GGUF: its logits."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T

    from llama2np.testing import gguf_export as ge

    entry = MANIFEST["mqa_bf16"]
    ids, want = reference(entry["reference"])
    ckpt = load_checkpoint(GOLDEN / entry["dir"])
    a = ckpt.args
    assert (a.norm_eps, a.rope_theta) == (1e-6, 1e6)
    h = ge.HParams(a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.vocab_size, a.norm_eps,
                   a.rope_theta, a.max_seq_len)
    path = ge.write_gguf(tmp_path / "mqa.gguf", h, {n: T.F32 for n in ge.meta_shapes(h)},
                         lambda n: to_float(ckpt.state[n], np.float32))  # GGUF keeps Meta's row order
    llama = Llama2.from_pretrained(path, dtype="float64")
    assert (llama.args.norm_eps, llama.args.rope_theta) == (1e-6, 1e6)
    check("mqa_bf16 as GGUF prefill", llama.model.forward(ids[None])[0], want)
