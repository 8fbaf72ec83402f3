#!/usr/bin/env python
"""Time from a fresh process to the first token, and the peak memory on the way.

    python scripts/bench/first_token.py weights/llama-2-7b-hf --tokens 1,8 --dtype float32,float64 --runs 3

Each run is a new Python process that imports llama2np, loads the checkpoint
(``Llama2.from_pretrained``), and computes the logits of ``--tokens`` prompt
ids (``Llama2.logits``, which keeps its KV cache as a chat would). Printed per
run: seconds from the process's start to imports done, to the model loaded
(read-ahead included), and to the first logits; and the peak RSS. Runs of
different settings alternate, so a busy machine disturbs them alike. With the
page cache warm (a run before) this is the warm start; ``--cold`` evicts the
checkpoint's files from the page cache before each run (``POSIX_FADV_DONTNEED``,
nothing else is evicted) for the figure from disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30


def child(spec: dict) -> dict:
    """One run (in the fresh process); ``spec["t0"]`` is the parent's clock just before starting it."""
    t_import = time.time()
    from llama2np import Llama2

    t_imported = time.time()
    model = Llama2.from_pretrained(spec["checkpoint"], dtype=spec["dtype"], progress=False)
    t_loaded = time.time()
    ids = np.random.default_rng(0).integers(3, model.args.vocab_size, spec["tokens"])
    model.logits(ids)
    t_first = time.time()
    return {"start": t_import - spec["t0"], "imported": t_imported - spec["t0"], "loaded": t_loaded - spec["t0"],
            "first": t_first - spec["t0"], "load_only": t_loaded - t_imported, "call": t_first - t_loaded,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def evict(checkpoint: str) -> None:
    """Drop the checkpoint's files from the page cache (pages another process maps stay)."""
    root = Path(checkpoint)
    for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(spec: dict, cold: bool) -> dict:
    if cold:
        evict(spec["checkpoint"])
    spec = {**spec, "t0": time.time()}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--tokens", default="1", help="prompt lengths of the first call, comma-separated")
    ap.add_argument("--dtype", default="float32", help="compute dtypes, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before every run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.child:
        print(json.dumps(child(json.loads(opts.child))))
        return 0
    if not opts.checkpoint:
        ap.error("a checkpoint path is needed")
    settings = [{"checkpoint": opts.checkpoint, "dtype": d, "tokens": int(t)}
                for d, t in itertools.product(opts.dtype.split(","), opts.tokens.split(","))]
    results: dict[int, list] = {i: [] for i in range(len(settings))}
    if not opts.cold:
        run(settings[0], False)  # warm the page cache
    for _ in range(opts.runs):
        for i, spec in enumerate(settings):
            r = run(spec, opts.cold)
            results[i].append(r)
            print(f"{spec['dtype']:8} {spec['tokens']:4} tokens: imports {r['imported']:.2f} s, loaded "
                  f"{r['loaded']:.2f} s (load {r['load_only']:.2f}), first logits {r['first']:.2f} s "
                  f"(call {r['call']:.2f}); peak RSS {r['peak_rss'] / GiB:.2f} GiB", flush=True)
    print("median:")
    for i, spec in enumerate(settings):
        rs = results[i]
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        print(f"{spec['dtype']:8} {spec['tokens']:4} tokens: first logits {med['first']:.2f} s from process start "
              f"(load {med['load_only']:.2f} s, call {med['call']:.2f} s), peak RSS {med['peak_rss'] / GiB:.2f} GiB "
              f"(max {max(r['peak_rss'] for r in rs) / GiB:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
