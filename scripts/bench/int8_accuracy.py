#!/usr/bin/env python
"""How far int8 weight-only quantisation moves the logits: max-abs error and top-1 agreement vs float32.

    python scripts/bench/int8_accuracy.py

Runs every golden fixture in tests/golden/ (their token sequences) and the
stories260K model of the real-weight test data, when present (its reference sequence, plus greedy decoding
from BOS compared with llama2.c's reference ids).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from llama2np import Llama2

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
SHARED = REPO.parent / "shared" / "data"


def greedy(model: Llama2, n: int) -> list[int]:
    """Token ids of greedy decoding from BOS, one token at a time through the KV cache."""
    transformer, ids = model.model, [1]
    cache = transformer.new_cache(1, n + 1)
    for pos in range(n):
        logits = transformer.forward(np.array([[ids[-1]]]), pos, cache)
        ids.append(int(logits[0, -1].argmax()))
    return ids


def compare(name: str, path: Path, ids: np.ndarray, **kw) -> tuple[int, int]:
    ref = Llama2.from_pretrained(path, **kw).logits(ids)
    q = Llama2.from_pretrained(path, quantize="int8", **kw).logits(ids)
    agree = int((ref.argmax(-1) == q.argmax(-1)).sum())
    err = float(np.abs(q - ref).max())
    print(f"{name:28s} {len(ids):4d} positions  max|dlogit| {err:.4f} (logits up to {np.abs(ref).max():.1f})"
          f"  top-1 agreement {agree}/{len(ids)}")
    return agree, len(ids)


def main() -> int:
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    total = [0, 0]
    for name, entry in sorted(manifest.items()):
        with np.load(GOLDEN / entry["reference"]) as z:
            ids = z["ids"]
        if entry["kind"] == "llama2c":
            path = SHARED.joinpath(*entry["shared"])
            if not path.exists():
                print(f"{name}: {path} not found, skipped")
                continue
            kw = {"tokenizer_path": SHARED.joinpath(*entry["tokenizer"])}
        else:
            path, kw = GOLDEN / entry["dir"], {}
        agree, n = compare(name, path, ids, **kw)
        total[0] += agree
        total[1] += n
    print(f"{'all golden sequences':28s} top-1 agreement {total[0]}/{total[1]} = {total[0] / total[1]:.2%}")

    stories = SHARED / "stories260K" / "stories260K.bin"
    if stories.exists():
        want = [int(t) for t in (SHARED / "reference" / "stories260K_greedy_200_ids.txt").read_text().split()]
        kw = {"tokenizer_path": SHARED / "stories260K" / "tok512.model"}
        got = greedy(Llama2.from_pretrained(stories, quantize="int8", **kw), len(want) - 1)
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)) - 1
        print(f"stories260K int8 greedy from BOS: first {same} of {len(want) - 1} generated tokens equal "
              "llama2.c's float32 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
