"""Distil the demo model's training corpus from the trained stories260K model.

    python scripts/demo/make_demo_corpus.py --out-dir /tmp/demo_build

Samples stories with llama2np's own batched ``Llama2.generate`` (temperature 1,
top-p 0.9, a distinct seed for every row), starting each row from BOS.
stories260K was trained on TinyStories packed as ``BOS story BOS story ...``
and never emits EOS, so a row runs for ``--max-new-tokens`` and holds several
stories: it is cut at every BOS, and the unfinished tail is dropped. Writes
one story per line to ``train.txt`` and, from every ``--heldout-every``-th
row, ``heldout.txt`` (for scripts/bench/eval_bpc.py). Same seed, same corpus.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llama2np import Llama2

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "stories260K"


def split_stories(ids: list[int], bos_id: int) -> list[list[int]]:
    """The complete stories in a row: the pieces that a BOS closes (the last piece is unfinished)."""
    stories, current = [], []
    for t in ids:
        if t == bos_id:
            if current:
                stories.append(current)
            current = []
        else:
            current.append(t)
    return stories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "stories260K.bin")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tok512.model")
    ap.add_argument("--out-dir", type=Path, required=True, help="where train.txt and heldout.txt go (outside git)")
    ap.add_argument("--rows", type=int, default=10240, help="sampled sequences in all")
    ap.add_argument("--first-row", type=int, default=0,
                    help="start at this row and append to the files (to extend a corpus or split the work)")
    ap.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=511)
    ap.add_argument("--heldout-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=20240)
    opt = ap.parse_args()

    model = Llama2.from_pretrained(opt.model, tokenizer_path=opt.tokenizer)
    tok = model.tokenizer
    opt.out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens, n_stories, t0 = 0, 0, time.time()
    mode = "a" if opt.first_row else "w"
    with open(opt.out_dir / "train.txt", mode, encoding="utf-8") as train, \
            open(opt.out_dir / "heldout.txt", mode, encoding="utf-8") as heldout:
        for first in range(opt.first_row, opt.rows, opt.batch_size):
            rows = range(first, min(first + opt.batch_size, opt.rows))
            seeds = [opt.seed + r for r in rows]
            outs = model.generate([[] for _ in rows], max_new_tokens=opt.max_new_tokens, temperature=1.0,
                                  top_p=0.9, seed=seeds)
            for r, ids in zip(rows, outs):
                n_tokens += len(ids)
                dest = heldout if r % opt.heldout_every == 0 else train
                for story in split_stories(ids, tok.bos_id):
                    text = " ".join(tok.decode(story).split())  # one line per story
                    if text:
                        dest.write(text + "\n")
                        n_stories += 1
            elapsed = time.time() - t0
            print(f"{rows.stop}/{opt.rows} rows, {n_tokens:,} tokens, {n_stories:,} stories, "
                  f"{n_tokens / elapsed:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
