#!/usr/bin/env python
"""Load time, peak memory, prefill and decode speed of one checkpoint (a quantized GGUF, or any other).

Prints one JSON line: seconds to load and run a first one-token forward, peak RSS
(the process's maximum resident set), prefill tokens/s over ``--prompt`` tokens
and the median decode step (one token with the KV cache kept) over
``--steps`` steps. Run it once per checkpoint, each in a fresh process, with the
page cache warm (run it twice; the second is the warm figure).

Usage:
    python scripts/bench/bench_gguf.py --model weights/llama-2-7b.Q4_K_M.gguf --steps 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np

from llama2np import Llama2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", type=int, default=16, help="prefill tokens (default 16)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="KV cache length (default 512)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=["int8"])
    a = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    llm = Llama2.from_pretrained(a.model, max_seq_len=a.max_seq_len, dtype=a.dtype, quantize=a.quantize)
    model = llm.model
    vocab = model.args.vocab_size
    model.forward(np.array([[1]]))
    first = time.perf_counter() - t0

    cache = model.new_cache(max_seq_len=a.prompt + a.steps + 1)
    ids = rng.integers(3, vocab, (1, a.prompt))
    t0 = time.perf_counter()
    logits = model.forward(ids, 0, cache)
    prefill = time.perf_counter() - t0
    steps = []
    for i in range(a.steps):
        token = np.array([[int(logits[0, -1].argmax())]])
        t0 = time.perf_counter()
        logits = model.forward(token, a.prompt + i, cache)
        steps.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"model": a.model, "dtype": a.dtype, "quantize": a.quantize,
                      "load_first_forward_s": round(first, 2), "peak_rss_gib": round(rss / 2 ** 30, 2),
                      f"prefill{a.prompt}_tok_s": round(a.prompt / prefill, 2),
                      "decode_tok_s_median": round(1 / statistics.median(steps), 3),
                      "decode_step_s": [round(s, 3) for s in steps]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
