"""Train the demo model's own sentencepiece tokenizer on the distilled story corpus.

    python scripts/demo/train_demo_tokenizer.py --corpus /tmp/demo_build/train.txt \
        --out /tmp/demo_build/demo_tok --vocab-size 1024

BPE with byte fallback and Llama 2's special ids (unk 0, BOS 1, EOS 2, no
pad), identity normalisation and a dummy prefix like Meta's tokenizer. The
whole corpus is read in order (no sampling, one thread), so the result is
the same on every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sentencepiece


def train_tokenizer(corpus: Path, prefix: Path, vocab_size: int) -> Path:
    """Write ``<prefix>.model`` (and ``.vocab``) and return the model's path."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        input_sentence_size=0,  # every line, in file order
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="training text, one story per line")
    ap.add_argument("--out", type=Path, required=True, help="output prefix: writes <out>.model and <out>.vocab")
    ap.add_argument("--vocab-size", type=int, default=1024)
    opt = ap.parse_args()
    model = train_tokenizer(opt.corpus, opt.out, opt.vocab_size)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    sample = "Once upon a time, there was a little girl named Lily."
    print(f"wrote {model}: {sp.vocab_size()} pieces; {sample!r} -> {sp.encode(sample, out_type=str)}")


if __name__ == "__main__":
    main()
