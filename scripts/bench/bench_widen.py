#!/usr/bin/env python
"""What a bf16 decode step costs per weight in NumPy: widening kernels side by side, alternating.

    python scripts/bench/bench_widen.py --threads 1,2 --rounds 5

A bf16 matrix of 7B's w1+w3 shape (22016 x 4096, 180 MB: past the last-level
cache, so every tile streams from memory as in a decode step) is multiplied
by one input row with each candidate kernel, tile by tile on ``--threads``
threads of ours (one BLAS thread each), candidates alternating within each
round; medians in G weights/s. Candidates:

- ``linear``: ``Linear`` itself (the engine's pair kernel: ``p << 16`` and
  ``p & 0xFFFF0000`` on uint32 pairs into one reused buffer, a GEMV after each);
- ``side``: both halves into one buffer side by side, one GEMV over both;
- ``cast``: ``np.left_shift`` uint16 -> uint32 (NumPy's casting loop), columns in
  their own order, one GEMV;
- ``strided``: the bf16 bits copied into the high halves of a zeroed float32
  buffer (a strided uint16 copy; the low halves stay zero), one GEMV.

Then the parts of the pair kernel on one thread: each widening pass alone on
streamed data, and the GEMV of an L2-resident widened tile. ``--torch`` adds
torch's bf16 matrix-vector product on the same bits (the CPU's own bf16
instructions, no widening in NumPy) as the native reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llama2np.model.linear import Linear, set_decode_tile  # noqa: E402
from llama2np.model.storage import BF16, float32_to_bf16  # noqa: E402
from llama2np.model.threads import blas_threads, run_parallel, set_num_threads  # noqa: E402

SHIFT, HIGH = np.uint32(16), np.uint32(0xFFFF0000)


def random_bf16(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, cols) bf16 bits (uint16) of N(0, 0.02) values, as a checkpoint holds them."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, cols), np.uint16)
    for r in range(0, rows, 2048):
        block = rng.standard_normal((min(2048, rows - r), cols), dtype=np.float32) * 0.02
        out[r : r + 2048] = float32_to_bf16(block).view(np.uint16)
    return out


def tiled(kernel, bits: np.ndarray, x: np.ndarray, tile_rows: int, threads: int) -> np.ndarray:
    """y = W x by kernel(rows of bits, x, rows of y, the thread's buffers) for every tile, threads taking
    the next tile from one queue."""
    y = np.empty(bits.shape[0], np.float32)
    queue = iter(range(0, bits.shape[0], tile_rows))

    def work(_):
        state = {}
        for r in queue:
            kernel(bits[r : r + tile_rows], x, y[r : r + tile_rows], state)

    run_parallel(work, range(threads))
    return y


def side(t, x, y, s):
    pairs = t.shape[1] // 2
    if "b" not in s:
        s["b"] = np.empty((t.shape[0], 2 * pairs), np.uint32)
        s["x"] = np.concatenate([x[0::2], x[1::2]])
    b, p = s["b"][: t.shape[0]], t.view(np.uint32)
    np.left_shift(p, SHIFT, out=b[:, :pairs])
    np.bitwise_and(p, HIGH, out=b[:, pairs:])
    np.dot(b.view(np.float32), s["x"], out=y)


def cast(t, x, y, s):
    b = s.setdefault("b", np.empty(t.shape, np.uint32))[: t.shape[0]]
    np.left_shift(t, SHIFT, out=b, dtype=np.uint32)
    np.dot(b.view(np.float32), x, out=y)


def strided(t, x, y, s):
    if "b" not in s:
        s["b"] = np.zeros(t.shape, np.uint32)  # the low halves are never written: they stay zero
    b = s["b"][: t.shape[0]]
    np.copyto(b.view(np.uint16)[:, 1::2], t)
    np.dot(b.view(np.float32), x, out=y)


def parts(bits: np.ndarray, tile_rows: int, rounds: int) -> dict[str, float]:
    """One thread: G weights/s of each widening pass on streamed tiles, and of the GEMV of a resident tile."""
    p = bits.view(np.uint32)
    buf = np.empty((tile_rows, p.shape[1]), np.uint32)
    x = np.ones(p.shape[1], np.float32)
    y = np.empty(tile_rows, np.float32)
    steps = {
        "even pass (p << 16)": lambda t: np.left_shift(t, SHIFT, out=buf[: len(t)]),
        "odd pass (p & 0xFFFF0000)": lambda t: np.bitwise_and(t, HIGH, out=buf[: len(t)]),
        "GEMV of a resident widened tile": lambda t: np.dot(buf[: len(t)].view(np.float32), x, out=y[: len(t)]),
    }
    np.left_shift(p[:tile_rows], SHIFT, out=buf)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, f in steps.items():
            t0 = time.perf_counter()
            for r in range(0, p.shape[0] - tile_rows + 1, tile_rows):
                f(p[r : r + tile_rows])
            times[name].append(time.perf_counter() - t0)
    done = (p.shape[0] // tile_rows) * tile_rows * p.shape[1]  # pairs each pass went through
    return {k: done / float(np.median(v)) / 1e9 for k, v in times.items()}  # widened values (= half the weights)


def torch_rate(bits: np.ndarray, threads: int, rounds: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    x = torch.ones(bits.shape[1], dtype=torch.bfloat16)
    torch.mv(w, x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return bits.size / float(np.median(times)) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tile", type=int, default=256 * 1024, help="widened values per tile")
    ap.add_argument("--shape", default="22016,4096", help="rows,columns of the bf16 matrix")
    ap.add_argument("--torch", action="store_true", help="also time torch's bf16 GEMV (the CPU's bf16 instructions)")
    opts = ap.parse_args(argv)
    rows, cols = (int(v) for v in opts.shape.split(","))
    bits = random_bf16(rows, cols)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    layer = Linear(bits.view(BF16), np.float32)
    set_decode_tile(opts.tile)
    pair_rows, row_rows = max(1, 2 * opts.tile // cols), max(1, opts.tile // cols)
    candidates = {
        "linear": lambda n: layer(x[None]),
        "side": lambda n: tiled(side, bits, x, pair_rows // 2, n),
        "cast": lambda n: tiled(cast, bits, x, row_rows, n),
        "strided": lambda n: tiled(strided, bits, x, row_rows, n),
    }
    print(f"bf16 {rows} x {cols} ({bits.nbytes / 1e6:.0f} MB), {opts.tile} values per tile, "
          f"{opts.rounds} rounds, G weights/s (median, range)")
    with blas_threads(1):
        for n in (int(v) for v in opts.threads.split(",")):
            set_num_threads(n)
            times: dict[str, list[float]] = {k: [] for k in candidates}
            for f in candidates.values():
                f(n)  # buffers and plans once
            for _ in range(opts.rounds):
                for k, f in candidates.items():
                    t0 = time.perf_counter()
                    f(n)
                    times[k].append(time.perf_counter() - t0)
            for k, v in times.items():
                rates = sorted(bits.size / t / 1e9 for t in v)
                print(f"  {n} thread(s) {k:8s} {np.median(rates):5.2f}  ({rates[0]:.2f}-{rates[-1]:.2f})")
            if opts.torch:
                print(f"  {n} thread(s) torch bf16 GEMV {torch_rate(bits, n, opts.rounds):5.2f}")
        set_num_threads(1)
        for k, v in parts(bits, pair_rows, opts.rounds).items():
            print(f"  1 thread, {k}: {v:.2f} G values/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
