#!/usr/bin/env python
"""Peak memory of a trace: written to a file as the forward pass goes, against a plain forward pass.

    python scripts/bench/bench_trace.py --model weights/llama-2-7b [--tokens 512] [--dtype float64] \
        [--modes logits,file,memory]

Each mode runs in a fresh process (peak RSS is per process): ``logits`` (one forward pass,
no KV cache kept), ``file`` (``Llama2.trace(out=..., steps="all")``) and ``memory`` (the
same trace returned as a dict). Prints peak RSS, the RSS after loading, seconds, and the
trace file's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(model: str, tokens: int, dtype: str, mode: str, out: Path) -> dict:
    from llama2np import Llama2

    m = Llama2.from_pretrained(model, dtype=dtype)
    ids = np.random.default_rng(0).integers(3, m.args.vocab_size, tokens)
    ids[0] = 1
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "logits":
        m.logits(ids, reuse_cache=False)
    elif mode == "file":
        m.trace(ids, out=out, steps="all")
    else:
        m.trace(ids, steps="all")
    return {"mode": mode, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loaded_mib": loaded, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--modes", default="logits,file,memory", help="which of logits, file, memory to run")
    p.add_argument("--mode", choices=["logits", "file", "memory"], help=argparse.SUPPRESS)  # one child run
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run(a.model, a.tokens, a.dtype, a.mode, a.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace.npz"
        print(f"{a.model}, {a.tokens} tokens, {a.dtype}")
        for mode in a.modes.split(","):
            r = subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens),
                                "--dtype", a.dtype, "--mode", mode, "--out", str(out)],
                               capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            size = f", file {out.stat().st_size / 2**20:.0f} MiB" if mode == "file" else ""
            print(f"  {mode:<7} peak RSS {res['peak_mib']:7.0f} MiB (after loading {res['loaded_mib']:.0f} MiB), "
                  f"{res['seconds']:.2f} s{size}")


if __name__ == "__main__":
    main()
