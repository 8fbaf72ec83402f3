#!/usr/bin/env python
"""Load time, peak memory, prefill and decode speed of GGUF files (a quantized one beside its bf16 one),
optionally beside llama.cpp on the same files, alternating in one run.

One file: prints one JSON line (seconds to load and run a first one-token
forward, peak RSS, prefill tokens/s over ``--prompt`` tokens, the median decode
step over ``--steps`` steps):

    python scripts/bench/bench_gguf.py --model weights/llama-2-7b.Q4_K_M.gguf --steps 8

Several files: each round runs, for each file in turn, ``llama-bench -t THREADS``
(with ``--llama-cpp``, llama.cpp's directory, its ``bin/`` or ``build/bin/``, or that directory itself) and
then llama2np in a fresh process; medians over rounds and the ratios:

    python scripts/bench/bench_gguf.py --model weights/7b.Q4_K_M.gguf,weights/7b-bf16.gguf \\
        --llama-cpp ~/src/llama.cpp --rounds 3

Optional, never in CI. Run it with the page cache warm (the first round warms it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure(a) -> dict:
    """llama2np on one file, in this process."""
    from llama2np import Llama2
    from llama2np.model.threads import set_num_threads

    if a.threads:
        set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    llm = Llama2.from_pretrained(a.model, max_seq_len=a.max_seq_len, dtype=a.dtype, quantize=a.quantize,
                                 progress=False)
    loaded, loaded_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model = llm.model
    model.forward(np.array([[1]]))
    first = time.perf_counter() - t0

    cache = model.new_cache(max_seq_len=a.prompt + a.steps + 1)
    ids = rng.integers(3, model.args.vocab_size, (1, a.prompt))
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
    return {"model": a.model, "dtype": a.dtype, "quantize": a.quantize, "load_s": round(loaded, 2),
            "load_cpu_s": round(loaded_cpu, 2),
            "load_first_forward_s": round(first, 2), "peak_rss_gib": round(rss / 2 ** 30, 2),
            "prefill_tok_s": round(a.prompt / prefill, 2), "decode_tok_s": round(1 / statistics.median(steps), 3),
            "decode_step_s": [round(s, 3) for s in steps]}


def llama_bench(root: Path, gguf: str, threads: int, prompt: int, steps: int) -> dict:
    """llama.cpp's ``llama-bench``: tok/s of pp PROMPT and tg STEPS, one repetition."""
    bench = next((root / c for c in ("bin/llama-bench", "build/bin/llama-bench", "llama-bench")
                  if (root / c).exists()), None)
    if bench is None:
        raise SystemExit(f"{root}: no llama-bench, bin/llama-bench or build/bin/llama-bench")
    cmd = [str(bench), "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(steps), "-r", "1", "-o", "json"]
    tests = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"prefill_tok_s": next(t["avg_ts"] for t in tests if t["n_gen"] == 0),
            "decode_tok_s": next(t["avg_ts"] for t in tests if t["n_prompt"] == 0)}


def child(a, model: str) -> dict:
    """``measure`` of one file in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--model", model, "--prompt", str(a.prompt), "--steps", str(a.steps),
           "--max-seq-len", str(a.max_seq_len), "--dtype", a.dtype, "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama2np on {model} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a, models: list[str]) -> None:
    runs: dict[str, list] = {m: [] for m in models}
    theirs: dict[str, list] = {m: [] for m in models}
    for r in range(a.rounds):
        for m in models:
            if a.llama_cpp:
                theirs[m].append(llama_bench(a.llama_cpp, m, a.threads, a.prompt, a.steps))
            runs[m].append(child(a, m))
            o = runs[m][-1]
            t = theirs[m][-1] if a.llama_cpp else None
            print(f"round {r + 1} {Path(m).name}: llama2np load + first forward {o['load_first_forward_s']} s (load "
                  f"{o['load_s']} s, {o['load_cpu_s']} CPU-s), peak RSS "
                  f"{o['peak_rss_gib']} GiB, prefill {a.prompt} {o['prefill_tok_s']} tok/s, decode {o['decode_tok_s']} tok/s"
                  + (f"; llama.cpp prefill {t['prefill_tok_s']:.2f}, decode {t['decode_tok_s']:.2f} tok/s" if t else ""),
                  flush=True)

    def med(rows, key):
        return float(np.median([x[key] for x in rows]))

    for m in models:
        o = runs[m]
        line = (f"median {Path(m).name}: llama2np load + first forward {med(o, 'load_first_forward_s'):.2f} s, "
                f"peak RSS {max(x['peak_rss_gib'] for x in o):.2f} GiB, prefill {med(o, 'prefill_tok_s'):.2f}, "
                f"decode {med(o, 'decode_tok_s'):.3f} tok/s")
        if a.llama_cpp:
            t = theirs[m]
            line += (f"; llama.cpp prefill {med(t, 'prefill_tok_s'):.2f}, decode {med(t, 'decode_tok_s'):.2f} tok/s; "
                     f"llama2np / llama.cpp decode {np.median([x['decode_tok_s'] / y['decode_tok_s'] for x, y in zip(o, t)]):.2f}x")
        print(line)
    base = models[-1]
    for m in models[:-1]:
        for key in ("decode_tok_s", "prefill_tok_s"):
            ours = [x[key] / y[key] for x, y in zip(runs[m], runs[base])]
            text = f"{Path(m).name} / {Path(base).name} {key}: llama2np {np.median(ours):.2f}x (rounds {[round(v, 2) for v in ours]})"
            if a.llama_cpp:
                peer = [x[key] / y[key] for x, y in zip(theirs[m], theirs[base])]
                text += f", llama.cpp {np.median(peer):.2f}x"
            print(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a GGUF file, or several separated by commas")
    parser.add_argument("--prompt", type=int, default=16, help="prefill tokens (default 16)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="KV cache length (default 512)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's directory (or the one holding llama-bench): run llama-bench beside llama2np")
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args(argv)
    models = a.model.split(",")
    if len(models) == 1 and not a.llama_cpp:
        print(json.dumps(measure(a)))
    else:
        compare(a, models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
