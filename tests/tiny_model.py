"""A tiny random Llama 2 and a tiny tokenizer, made on the spot, for tests that need no real-weight data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama2np import Llama2, ModelArgs, Tokenizer, Transformer
from llama2np.loaders.common import expected_shapes
from llama2np.testing import synthetic

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
    """``state`` as llama2.c's .bin (its own classifier: negative vocab_size in the header)."""
    synthetic.write_llama2c(path, args, lambda name, shape: state[name])
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
