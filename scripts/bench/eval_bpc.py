"""Bits per character of held-out stories under one or more models, each with its own tokenizer.

    python scripts/bench/eval_bpc.py --text /tmp/demo_build/heldout.txt \
        --model weights/demo \
        --model weights/stories260K/stories260K.bin=weights/stories260K/tok512.model

Each story (one per line) is encoded with BOS and scored by llama2np's forward
pass (``llama2np.perplexity``); bits per character = total negative
log-likelihood of the story's tokens in bits / number of characters of the
text. Unlike per-token loss it compares models whose tokenizers differ.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from llama2np import Llama2
from llama2np.tools.perplexity import perplexity


def bits_per_character(model: Llama2, stories: list[str]) -> tuple[float, int]:
    """(bits per character over all stories, tokens scored)."""
    nats, tokens = 0.0, 0
    for story in stories:
        result = perplexity(model.model, model.tokenizer.encode(story, bos=True))
        nats += result.nll * result.tokens
        tokens += result.tokens
    return nats / math.log(2) / sum(len(s) for s in stories), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="held-out stories, one per line")
    ap.add_argument("--model", action="append", required=True,
                    help="a checkpoint, or CHECKPOINT=TOKENIZER when the tokenizer is not beside it (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N stories")
    opt = ap.parse_args()

    stories = [s.strip() for s in opt.text.read_text(encoding="utf-8").splitlines() if s.strip()][:opt.limit]
    print(f"{len(stories)} stories, {sum(len(s) for s in stories):,} characters from {opt.text}")
    results = []
    for spec in opt.model:
        path, _, tok = spec.partition("=")
        model = Llama2.from_pretrained(path, tokenizer_path=tok or None)
        bpc, tokens = bits_per_character(model, stories)
        results.append(bpc)
        print(f"{path}: {bpc:.4f} bits/char ({tokens:,} tokens, vocab {model.args.vocab_size}, "
              f"{model.args.num_parameters():,} parameters)")
    if len(results) > 1:
        print(f"ratio first/last: {results[0] / results[-1]:.3f}")


if __name__ == "__main__":
    main()
