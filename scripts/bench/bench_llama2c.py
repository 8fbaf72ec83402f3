#!/usr/bin/env python
"""llama2np beside llama2.c's ``run`` on the same llama2.c checkpoints: decode tok/s, alternating.

    python scripts/bench/bench_llama2c.py weights/15m.bin,weights/110m.bin --run llama2.c/run \\
        --tokenizer llama2.c/tokenizer.bin --rounds 5 --steps 200

Optional (never in CI): needs llama2.c built (``gcc -Ofast -fopenmp -march=native run.c -lm -o run``).
Each round and checkpoint runs ``OMP_NUM_THREADS=THREADS run FILE -z TOKENIZER -n STEPS -t 0 -s 1``
(its own "achieved tok/s": steps after the first over their wall time), then the same number of
greedy decode steps in this process (each model loaded once, before the first round), timed the
same way. Medians over rounds, with the range, and llama2np / llama2.c per round.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import time

import numpy as np


def llama2c_round(run: str, checkpoint: str, tokenizer: str, steps: int, threads: int) -> float:
    """llama2.c's achieved tok/s for ``steps`` greedy steps from BOS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([run, checkpoint, "-z", tokenizer, "-n", str(steps), "-t", "0", "-s", "1"],
                          capture_output=True, text=True, env=env, check=True)
    found = re.search(r"achieved tok/s: ([0-9.]+)", proc.stdout + proc.stderr)
    if found is None:
        raise SystemExit(f"{run}: no 'achieved tok/s' in its output")
    return float(found.group(1))


def llama2np_round(model, steps: int) -> tuple[float, float]:
    """(tok/s over steps 2..steps, cores used) of greedy decoding from BOS, as llama2.c counts it."""
    cache = model.new_cache(1, steps)
    token, start, cpu0 = 1, None, 0.0
    for pos in range(steps):
        logits = model.forward(np.array([[token]]), pos, cache)
        token = int(logits[0, -1].argmax())
        if start is None:  # llama2.c starts its clock after the first step
            start, cpu0 = time.perf_counter(), _cpu_seconds()
    wall = time.perf_counter() - start
    return (steps - 1) / wall, (_cpu_seconds() - cpu0) / wall


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", help="llama2.c checkpoint files, comma-separated")
    ap.add_argument("--run", required=True, help="llama2.c's compiled run")
    ap.add_argument("--tokenizer", required=True, help="llama2.c's tokenizer.bin")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count())
    opts = ap.parse_args(argv)

    from llama2np.llama import Llama2
    from llama2np.model.threads import set_num_threads

    set_num_threads(opts.threads)
    paths = opts.checkpoints.split(",")
    models = {p: Llama2.from_pretrained(p).model for p in paths}
    for p, m in models.items():
        m.forward(np.array([[1]]), 0, m.new_cache(1, 1))  # warm: first-call costs are not decode
    results = {p: {"c": [], "np": [], "cores": []} for p in paths}
    for r in range(opts.rounds):
        for p in paths:
            c = llama2c_round(opts.run, p, opts.tokenizer, opts.steps, opts.threads)
            n, cores = llama2np_round(models[p], opts.steps)
            results[p]["c"].append(c)
            results[p]["np"].append(n)
            results[p]["cores"].append(cores)
            print(f"round {r + 1} {os.path.basename(p)}: llama2.c {c:.1f} tok/s, llama2np {n:.1f} tok/s "
                  f"({cores:.2f} cores): {n / c:.2f}x", flush=True)
    for p, res in results.items():
        c, n = np.array(res["c"]), np.array(res["np"])
        ratio = n / c
        print(f"{os.path.basename(p)}, {opts.threads} threads, {opts.rounds} rounds: llama2.c median {np.median(c):.1f} "
              f"({c.min():.1f}-{c.max():.1f}) tok/s, llama2np median {np.median(n):.1f} ({n.min():.1f}-{n.max():.1f}) "
              f"tok/s on {np.median(res['cores']):.2f} cores: ratio median {np.median(ratio):.2f}x "
              f"({ratio.min():.2f}-{ratio.max():.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
