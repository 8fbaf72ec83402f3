"""A tiny random Llama 2 and a tiny tokenizer, made on the spot, for tests that need no real-weight data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama2np import Llama2, ModelArgs, Tokenizer, Transformer
from llama2np.loaders.common import expected_shapes

WORDS = ("once upon a time there was a little llama who liked to run and jump in the big green park "
         "with her friends the dog and the cat ; every day they sang songs , ate apples and played ball .").split()


def tiny_args(vocab_size: int = 320, max_seq_len: int = 48) -> ModelArgs:
    # grouped-query attention and an explicit FFN width, like stories260K
    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, hidden_dim=64,
                     max_seq_len=max_seq_len)


def tiny_state(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor the loaders expect (Meta's naming); norms are ones.

    Scaled so the logits are far from uniform: the embedding by sqrt(dim), the output by 4.
    """
    rng = np.random.default_rng(seed)
    scale = {"tok_embeddings.weight": np.sqrt(args.dim), "output.weight": 4.0}

    def w(name, shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return (rng.normal(size=shape) * scale.get(name, 1.0) / np.sqrt(shape[-1])).astype(np.float32)

    return {name: w(name, shape) for name, shape in expected_shapes(args).items()}


def tiny_model(args: ModelArgs | None = None, tokenizer: Tokenizer | None = None, seed: int = 0) -> Llama2:
    args = args or tiny_args()
    return Llama2(Transformer(args, tiny_state(args, seed)), tokenizer)


def write_llama2c(path: Path, args: ModelArgs, state: dict[str, np.ndarray]) -> Path:
    """llama2.c's .bin: 7 int32 header values, then float32 arrays; vocab_size < 0 = own classifier."""
    L = args.n_layers

    def stack(name):
        return np.stack([state[f"layers.{i}.{name}.weight"] for i in range(L)])

    header = np.array([args.dim, args.ffn_hidden_dim, L, args.n_heads, args.n_kv_heads, -args.vocab_size,
                       args.max_seq_len], dtype="<i4")
    half = args.head_dim // 2
    arrays = [state["tok_embeddings.weight"], stack("attention_norm"), stack("attention.wq"), stack("attention.wk"),
              stack("attention.wv"), stack("attention.wo"), stack("ffn_norm"), stack("feed_forward.w1"),
              stack("feed_forward.w2"), stack("feed_forward.w3"), state["norm.weight"],
              np.zeros((args.max_seq_len, half)), np.zeros((args.max_seq_len, half)), state["output.weight"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return path


def train_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """A small BPE sentencepiece model with byte fallback (BOS=1, EOS=2), trained on made-up sentences."""
    import sentencepiece

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(400)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    prefix = directory / "tiny"
    sentencepiece.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")
