"""The Llama 2 transformer in NumPy: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Reads top to bottom like the forward pass (Touvron et al. 2023, and Meta's
``llama/model.py``):

    tokens -> tok_embeddings -> n_layers x [ h += attention(attention_norm(h))
                                              h += feed_forward(ffn_norm(h)) ]
           -> norm -> output -> logits

Weights arrive as a dict in Meta's naming and layout (``layers.0.attention.wq.weight``
...); every loader maps its format onto that. wq/wk rows are in Meta's RoPE
order: each head's dimensions are (real, imaginary) pairs side by side.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, InputError
from .args import ModelArgs
from .kv_cache import KVCache
from .linear import Int8Linear, Linear, QuantizedTensor
from .quant_blocks import is_block_quantized, make_block_linear
from .rope import RopeTable, rope_tables  # noqa: F401 (rope_tables: re-exported for callers that build layers)
from .storage import check_finite_fp16, to_float
from .threads import blas_threads
from .tuning import tune_for

# --- the blocks -------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    ms = np.square(x).sum(axis=-1, keepdims=True) / x.shape[-1]
    return x * (1.0 / np.sqrt(ms + eps)) * weight


def apply_rope(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Rotate each (even, odd) pair of a head's dimensions by its position's angle.

    x: (batch, seq, heads, head_dim); rotation: (seq, head_dim // 2) from
    ``rope_tables``, or (batch, seq, head_dim // 2) when each row is at its own position.
    This is Meta's layout: dimension pairs (2i, 2i+1) form the
    complex number rotated by frequency i (HF reorders the rows of wq/wk so it
    can rotate halves instead; ``Attention`` puts such q/k outputs back in this order).
    """
    # A (real, imaginary) pair is laid out exactly like one complex number, so the
    # rotation is one complex multiply, as in Meta's code (view_as_complex).
    pairs = np.ascontiguousarray(x).view(rotation.dtype)  # (batch, seq, heads, head_dim/2)
    return (pairs * rotation[..., None, :]).view(x.dtype)


def halves_to_pairs(x: np.ndarray) -> np.ndarray:
    """(..., head_dim) in HF's order (real halves, then imaginary) -> Meta's (real, imaginary) pairs.

    Exact (values only move); the one copy replaces the one ``apply_rope`` would make of the
    strided q/k views, so reading HF's rows as stored costs no extra pass over the outputs.
    """
    half = x.shape[-1] // 2
    # (..., 2, half) -> (..., half, 2) -> (..., head_dim)
    return np.ascontiguousarray(x.reshape(*x.shape[:-1], 2, half).swapaxes(-1, -2)).reshape(x.shape)


# softmax and silu work in place on one new array: at prefill their inputs are the biggest
# arrays of the forward pass (scores: batch x heads x seq x seq), and every extra temporary
# is another trip through memory.


def softmax(x: np.ndarray) -> np.ndarray:
    e = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    s = np.negative(x)
    np.exp(s, out=s)
    s += 1.0
    return np.divide(x, s, out=s)


class Attention:
    """Multi-head self-attention with grouped key/value heads and rotary positions.

    It computes the heads whose rows ``wqkv`` holds: all of them, or a tensor-parallel
    slice (then ``wo`` holds the matching columns and the output is a partial sum).
    ``rope_halves``: wq and wk hold their rows in HF's order (per head, every real part, then
    every imaginary part), so q and k are reordered into Meta's pairs per token.
    """

    observer: Callable[[str, np.ndarray], None] | None = None  # tracing (tools/trace.py) sees q, k, v

    def __init__(self, args: ModelArgs, wqkv: Linear, wo: Linear, rope_halves: bool = False):
        self.head_dim = args.head_dim
        self.n_heads, self.n_kv_heads = wqkv.sizes[0] // self.head_dim, wqkv.sizes[1] // self.head_dim
        self.wqkv, self.wo = wqkv, wo  # wqkv: wq, wk and wv stacked, one pass over x for all three
        self.rope_halves = rope_halves

    def __call__(self, x, start_pos, rotation, mask, cache_k=None, cache_v=None):
        bsz, seqlen, _ = x.shape
        g, r, hd = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv.split(self.wqkv(x))
        q = q.reshape(bsz, seqlen, self.n_heads, hd)
        k = k.reshape(bsz, seqlen, g, hd)
        v = v.reshape(bsz, seqlen, g, hd)
        if self.rope_halves:
            q, k = halves_to_pairs(q), halves_to_pairs(k)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        if self.observer is not None:
            for name, value in (("q", q), ("k", k), ("v", v)):
                self.observer(name, value)

        k = k.transpose(0, 2, 1, 3)  # (batch, kv_heads, seq, head_dim)
        v = v.transpose(0, 2, 1, 3)
        if cache_k is not None:
            if np.ndim(start_pos):  # one token per row, row b at position start_pos[b]
                rows = np.arange(bsz)
                cache_k[rows, :, start_pos] = k[:, :, 0]
                cache_v[rows, :, start_pos] = v[:, :, 0]
                end = int(start_pos.max()) + 1
            else:
                end = start_pos + seqlen
                cache_k[:, :, start_pos:end] = k
                cache_v[:, :, start_pos:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # (batch, kv_heads, kv_len, head_dim)

        # Query head h uses key/value head h // r: group the r query heads of each kv head
        # on one axis so the matmul broadcasts over them instead of copying K and V r times.
        q = q.reshape(bsz, seqlen, g, r, hd).transpose(0, 2, 3, 1, 4)  # (batch, kv_heads, r, seq, hd)
        q = q.reshape(bsz, g, r * seqlen, hd)
        scores = q @ k.transpose(0, 1, 3, 2)  # (batch, kv_heads, r*seq, kv_len)
        scores *= 1.0 / math.sqrt(hd)
        scores = scores.reshape(bsz, g, r, seqlen, -1)
        if mask is not None:
            scores += mask  # (seq, kv_len), or (batch, 1, 1, 1, kv_len) for rows at their own positions
        probs = softmax(scores).reshape(bsz, g, r * seqlen, -1)
        out = (probs @ v).reshape(bsz, g, r, seqlen, hd)  # (batch, kv_heads, r, seq, hd)
        out = out.transpose(0, 3, 1, 2, 4).reshape(bsz, seqlen, -1)  # (batch, seq, dim)
        return self.wo(out)


class FeedForward:
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, w13: Linear, w2: Linear):
        self.w13, self.w2 = w13, w2  # w13: w1 and w3 stacked, one pass over x for both

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate, up = self.w13.split(self.w13(x))
        h = silu(gate)
        h *= up
        return self.w2(h)


def check_quantize(quantize: str | None) -> None:
    if quantize not in (None, "int8"):
        raise InputError(f"quantize must be None or 'int8', got {quantize!r}")


def linear_maker(params: Mapping[str, np.ndarray], dtype: np.dtype, quantize: str | None = None):
    """``lin(*names)``: one ``Linear`` (``Int8Linear`` when quantize="int8") over the named matrices, stacked."""
    check_quantize(quantize)
    stored = getattr(params, "stored", params.__getitem__)  # HF's q/k rows as stored, not reordered copies

    def lin(*names: str) -> Linear:
        weights = [stored(n) for n in names]
        # a quantized checkpoint's matrices are int8 already, whatever was asked for
        quantized = quantize == "int8" or any(isinstance(w, QuantizedTensor) for w in weights)
        with naming_damage(params, names):
            if quantized:  # Linear checks its own float16 parts; quantizing inf would hide it in the scales
                check_finite_fp16(weights)
                layer = Int8Linear(weights, dtype)
            elif any(is_block_quantized(w) for w in weights):  # a quantized GGUF's own values (quant_blocks.py)
                layer = make_block_linear(weights, dtype)
            else:
                layer = Linear(weights, dtype)
        if quantize and hasattr(params, "release"):  # the float originals are no longer needed
            for n in names:
                params.release(n)
        return layer

    return lin


@contextlib.contextmanager
def naming_damage(params: Mapping[str, np.ndarray], names: Sequence[str]):
    """A damaged-weight CheckpointError raised inside, re-raised naming the checkpoint and the tensor."""
    try:
        yield
    except CheckpointError as e:
        k = getattr(e, "part", None)
        source = getattr(params, "source", None)
        name = names[k] if k is not None and k < len(names) else ", ".join(names)
        raise CheckpointError(f"{f'{source}: ' if source else ''}tensor {name}: {e}") from None


def build_layer(args: ModelArgs, params: Mapping[str, np.ndarray], i: int, lin) -> tuple[Attention, FeedForward]:
    """Layer ``i``'s attention and feed-forward from ``params`` (whole, or a tensor-parallel slice)."""
    p = f"layers.{i}."
    wq, wk, wv = (p + f"attention.{w}.weight" for w in ("wq", "wk", "wv"))
    in_halves = getattr(params, "in_halves_order", lambda name: False)
    if in_halves(wq) != in_halves(wk):
        raise InputError(f"{wq} and {wk} must hold their rows in the same RoPE order")
    attention = Attention(args, lin(wq, wk, wv), lin(p + "attention.wo.weight"), rope_halves=in_halves(wq))
    ffn = FeedForward(lin(p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"),
                      lin(p + "feed_forward.w2.weight"))
    return attention, ffn


def causal_mask(seqlen: int, start_pos: int, dtype: np.dtype) -> np.ndarray | None:
    """(seq, start_pos + seq) additive mask: token i attends to cached positions and new positions <= i.

    None for one token, which attends to everything before it.
    """
    if seqlen == 1:
        return None
    return np.triu(np.full((seqlen, start_pos + seqlen), -np.inf, dtype=dtype), k=start_pos + 1)


class TransformerBlock:
    observer: Callable[[str, np.ndarray], None] | None = None  # tracing (tools/trace.py) sees each step's output

    def __init__(self, args: ModelArgs, attention: Attention, feed_forward: FeedForward,
                 attention_norm: np.ndarray, ffn_norm: np.ndarray):
        self.eps = args.norm_eps
        self.attention, self.feed_forward = attention, feed_forward
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm

    def __call__(self, x, start_pos, rotation, mask, cache_k=None, cache_v=None):
        xn = rms_norm(x, self.attention_norm, self.eps)
        a = self.attention(xn, start_pos, rotation, mask, cache_k, cache_v)
        h = x + a
        hn = rms_norm(h, self.ffn_norm, self.eps)
        f = self.feed_forward(hn)
        if self.observer is not None:
            for name, value in (("attention_norm", xn), ("attention", a), ("ffn_norm", hn), ("feed_forward", f)):
                self.observer(name, value)
        return h + f


class Transformer:
    """The whole network. ``forward`` maps token ids to next-token logits."""

    # tracing (tools/trace.py): observer(name, array) sees "tok_embeddings", each "layers.{i}" output and "norm"
    observer: Callable[[str, np.ndarray], None] | None = None

    def __init__(self, args: ModelArgs, params: Mapping[str, np.ndarray], dtype: str | np.dtype = "float32",
                 quantize: str | None = None,
                 make_layer: Callable[[int], tuple[Attention, FeedForward]] | None = None):
        """``quantize``: None (weights as stored) or "int8" (weight-only, per-row scales).
        ``make_layer(i)``: layer i's (attention, feed-forward); by default ``build_layer`` from
        ``params`` (the tensor-parallel model passes ones whose work is done elsewhere)."""
        self.args, self.dtype = args, np.dtype(dtype)
        lin = linear_maker(params, self.dtype, quantize)
        make_layer = make_layer or (lambda i: build_layer(args, params, i, lin))

        def vec(name):  # norms are tiny: keep them in the compute dtype
            return to_float(params[name], self.dtype)

        self.tok_embeddings = params["tok_embeddings.weight"]  # (vocab, dim), any storage dtype
        with naming_damage(params, ["tok_embeddings.weight"]):
            check_finite_fp16([self.tok_embeddings])
        self.layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            attention, ffn = make_layer(i)
            self.layers.append(TransformerBlock(args, attention, ffn, vec(p + "attention_norm.weight"),
                                                vec(p + "ffn_norm.weight")))
        self.norm = vec("norm.weight")
        self.output = lin("output.weight")
        self.tiled = any(m.tiled for m in self.linears())  # some weights are widened tile by tile
        tune_for(sum(p.nbytes for m in self.linears() if m.tiled for p in m.parts))  # this CPU's decode tile
        self.rope = RopeTable(args, self.dtype)

    def linears(self) -> list[Linear]:
        """Every weight matrix of the network (stacked ones as one), embedding excluded."""
        mats = [m for l in self.layers for m in (l.attention.wqkv, l.attention.wo,
                                                 l.feed_forward.w13, l.feed_forward.w2)]
        return mats + [self.output]

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.args, batch_size, max_seq_len or self.args.max_seq_len, self.dtype)

    def forward(self, tokens: np.ndarray, start_pos: int = 0, cache: KVCache | None = None,
                on_layer: Callable[[int], None] | None = None) -> np.ndarray:
        """Logits for every position of ``tokens`` (batch, seq) -> (batch, seq, vocab).

        Without a cache the tokens are a whole sequence starting at position 0.
        With a cache they continue it at ``start_pos``: their keys and values
        are stored and they attend to everything before them.
        ``on_layer(i)`` is called after layer i (progress bars on long forwards).
        """
        tokens = np.asarray(tokens)
        bsz, seqlen = tokens.shape
        if np.ndim(start_pos):
            return self._forward_rows(tokens, np.asarray(start_pos, dtype=np.int64), cache)
        end = start_pos + seqlen
        limit = cache.max_seq_len if cache is not None else self.args.max_seq_len
        if cache is None and start_pos != 0:
            raise InputError("start_pos > 0 needs the KV cache that holds the earlier positions")
        if end > limit:
            raise InputError(f"positions {start_pos}..{end - 1} exceed the context length {limit}")
        if cache is not None and cache.batch_size != bsz:
            raise InputError(f"batch of {bsz} sequences does not match the cache's {cache.batch_size}")
        if seqlen == 0:
            raise InputError("forward needs at least one token")
        if cache is not None:
            cache.reserve(end)

        rotation = self.rope(start_pos, end)  # (seq, head_dim // 2)
        return self._layers(tokens, start_pos, rotation, causal_mask(seqlen, start_pos, self.dtype), cache, on_layer)

    # Rows at their own positions: each row of a batch continues its own sequence, so sequences
    # that started at different times decode in one forward pass (continuous batching).
    rows_at_own_positions = True

    def _forward_rows(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache | None) -> np.ndarray:
        """One token per row, row b at position positions[b] of its own sequence: (batch, 1) -> (batch, 1, vocab).

        Row b attends to its cache positions 0..positions[b]; what other rows' longer
        sequences hold beyond that is masked out.
        """
        bsz, seqlen = tokens.shape
        if cache is None or seqlen != 1 or positions.shape != (bsz,):
            raise InputError("per-row positions take one token per row, a (batch,) array of positions and a cache")
        if cache.batch_size != bsz:
            raise InputError(f"batch of {bsz} sequences does not match the cache's {cache.batch_size}")
        end = int(positions.max()) + 1
        if positions.min() < 0 or end > cache.max_seq_len:
            raise InputError(f"positions {positions.min()}..{end - 1} are outside the context length "
                             f"{cache.max_seq_len}")
        cache.reserve(end)
        rotation = self.rope.rows(positions)[:, None]  # (batch, 1, head_dim // 2)
        later = np.arange(end) > positions[:, None]  # (batch, end): positions after each row's own
        mask = np.where(later, -np.inf, 0.0).astype(self.dtype)[:, None, None, None, :]  # (batch, 1, 1, 1, end)
        return self._layers(tokens, positions, rotation, mask, cache, None)

    def _layers(self, tokens, start_pos, rotation, mask, cache, on_layer) -> np.ndarray:
        h = to_float(self.tok_embeddings[tokens], self.dtype)  # (batch, seq, dim)
        observe = self.observer
        if observe is not None:
            observe("tok_embeddings", h)
        # Our threads split the weight multiplies (widening bf16/int8 tiles), one BLAS thread each
        # (see linear.py and threads.py).
        with blas_threads(1):
            for i, layer in enumerate(self.layers):
                ck = cache.k[i] if cache is not None else None
                cv = cache.v[i] if cache is not None else None
                h = layer(h, start_pos, rotation, mask, ck, cv)
                if observe is not None:
                    observe(f"layers.{i}", h)
                if on_layer is not None:
                    on_layer(i)
            h = rms_norm(h, self.norm, self.args.norm_eps)
            if observe is not None:
                observe("norm", h)
            return self.output(h)  # (batch, seq, vocab)
